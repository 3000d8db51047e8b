//! TLS certificates made at test time.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;

use crate::proc::pg_run_as;
use crate::{TempDir, COUNTER};

/// Certificates for TLS tests, made at test time with the `openssl` command line: a CA, a server
/// certificate for `localhost` and `127.0.0.1` signed by it, a client certificate with the
/// common name `bridge_reader` signed by it, and an unrelated second CA. Files: `ca.pem`,
/// `server.pem`, `server.key`, `pg-server.key` (owned by the account PostgreSQL runs as, mode
/// 0600, as PostgreSQL demands), `client.pem`, `client.key`, `other-ca.pem`.
pub struct TestCerts {
    dir: TempDir,
}

impl TestCerts {
    /// Generates the files (P-256 keys: quick to make, accepted by PostgreSQL and rustls).
    pub fn generate() -> Self {
        let dir = TempDir::new("certs");
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl (needed by the TLS tests)");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (ca, cn) in [("ca", "pgbridge test CA"), ("other-ca", "unrelated CA")] {
            let (key, pem, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN={cn}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend([
                "-keyout",
                &key,
                "-out",
                &pem,
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(&args);
        }
        for (name, cn, ext) in [
            (
                "server",
                "localhost",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "bridge_reader", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, pem, extfile) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            fs::write(
                d.join(&extfile),
                format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{ext}"),
            )
            .unwrap();
            let subj = format!("/CN={cn}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&args);
            let serial = format!(
                "0x{:x}",
                std::process::id() as u64 * 1000 + COUNTER.fetch_add(1, Ordering::Relaxed) as u64
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial,
                "-days",
                "2",
                "-extfile",
                &extfile,
                "-out",
                &pem,
            ]);
        }
        let pg_key = d.join("pg-server.key");
        fs::copy(d.join("server.key"), &pg_key).unwrap();
        fs::set_permissions(&pg_key, fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = pg_run_as() {
            std::os::unix::fs::chown(&pg_key, Some(uid), Some(gid)).unwrap();
        }
        TestCerts { dir }
    }

    /// The file `name` (see the type's documentation).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// [`TestCerts::path`] as a string, for command lines and configuration files.
    pub fn file(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }
}
