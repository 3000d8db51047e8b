//! `bridge`: parses the command line, loads the configuration and runs the bridge.
//!
//! Exit codes: 0 clean, 1 runtime failure, 2 bad usage or configuration.

use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};

use pgbridge::cli::{usage_error_line, Command, DlqCommand, EXIT_FAILURE, EXIT_USAGE};
use pgbridge::config::Config;
use pgbridge::shutdown::Shutdown;

/// glibc's allocator, with small blocks grown ahead of need: see [`pgbridge::alloc`].
#[global_allocator]
static ALLOCATOR: pgbridge::alloc::SmallGrowth = pgbridge::alloc::SmallGrowth;

fn main() -> ExitCode {
    let (cli, layers) = match pgbridge::cli::parse() {
        Ok(parsed) => parsed,
        Err(err) => return usage_exit(&err),
    };
    // The watch commands print for people and scripts: only warnings and errors besides.
    init_logging(match cli.action() {
        Command::Tail(_) | Command::Snapshot(_) | Command::Dlq(_) => "warn",
        _ => "info",
    });

    let config = match Config::load(layers) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("bridge: configuration error: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };

    match cli.action() {
        Command::CheckConfig => {
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Health => match pgbridge::control::probe::probe_health(&config.http) {
            Ok((200, body)) => {
                println!("{body}");
                ExitCode::SUCCESS
            }
            Ok((_, body)) => {
                println!("{body}");
                ExitCode::from(EXIT_FAILURE)
            }
            Err(err) => {
                eprintln!("bridge: health check failed: {err}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Mirror(args) => {
            let shutdown = Shutdown::new();
            if let Err(err) = install_signal_handlers(&shutdown) {
                eprintln!("bridge: cannot install signal handlers: {err}");
                return ExitCode::from(EXIT_FAILURE);
            }
            warn_plaintext_credentials(&config);
            let options = args.options(&config);
            match pgbridge::mirror::run(&config, &options, &shutdown) {
                Ok(s) => {
                    info!(
                        "mirror stopped: snapshots={} snapshot_rows={} applied={} skipped={}",
                        s.snapshots, s.snapshot_rows, s.applied, s.skipped
                    );
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("bridge mirror: error: {err}");
                    ExitCode::from(err.exit_code())
                }
            }
        }
        Command::Tail(args) => {
            let shutdown = Shutdown::new();
            if let Err(err) = install_signal_handlers(&shutdown) {
                eprintln!("bridge: cannot install signal handlers: {err}");
                return ExitCode::from(EXIT_FAILURE);
            }
            let options = args.options(&config);
            match pgbridge::watch::tail::run(&config, &options, &shutdown) {
                Ok(_) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("bridge tail: error: {err}");
                    ExitCode::from(err.exit_code())
                }
            }
        }
        Command::Snapshot(args) => {
            let shutdown = Shutdown::new();
            if let Err(err) = install_signal_handlers(&shutdown) {
                eprintln!("bridge: cannot install signal handlers: {err}");
                return ExitCode::from(EXIT_FAILURE);
            }
            let wait = Duration::from_secs(args.wait_secs);
            match pgbridge::watch::snapshot::run(&config, &args.table, wait, &shutdown) {
                Ok(summary) => {
                    println!("{}", summary.line(&args.table));
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("bridge snapshot: error: {err}");
                    ExitCode::from(err.exit_code())
                }
            }
        }
        Command::Dlq(dlq) => {
            let mut out = std::io::stdout().lock();
            let done = match &dlq {
                DlqCommand::List => pgbridge::watch::dlq::list(&config, &mut out).map(drop),
                DlqCommand::Replay(a) => pgbridge::watch::dlq::replay(
                    &config,
                    &a.seqs,
                    a.to.as_deref(),
                    a.keep,
                    &mut out,
                ),
            };
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("bridge dlq: error: {err}");
                    ExitCode::from(err.exit_code())
                }
            }
        }
        Command::Run => {
            let shutdown = Shutdown::new();
            if let Err(err) = install_signal_handlers(&shutdown) {
                eprintln!("bridge: cannot install signal handlers: {err}");
                return ExitCode::from(EXIT_FAILURE);
            }
            info!(
                "bridge {} starting: {}",
                env!("CARGO_PKG_VERSION"),
                config.summary()
            );
            warn_plaintext_credentials(&config);
            let code = pgbridge_run(config, shutdown);
            ExitCode::from(u8::try_from(code).unwrap_or(EXIT_FAILURE))
        }
    }
}

/// Credentials over plain text to a remote NATS server are worth a warning at every start.
fn warn_plaintext_credentials(config: &Config) {
    if let Some(warning) = config.nats.plaintext_credentials_warning() {
        log::warn!("{warning}");
    }
}

/// Help and version go to stdout with exit 0; anything else is one line on stderr and exit 2.
fn usage_exit(err: &clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Nothing sensible is left to do if printing the help fails.
            let _ = err.print();
            ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(EXIT_USAGE))
        }
        _ => {
            eprintln!("bridge: usage error: {}", usage_error_line(err));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `default` unless `RUST_LOG` says otherwise.
fn init_logging(default: &str) {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default)).init();
}

/// The first SIGINT or SIGTERM asks for a graceful shutdown; a second one, while the first is
/// still being handled, exits at once with code 1, for when draining hangs.
fn install_signal_handlers(shutdown: &Shutdown) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let name = if signal == SIGINT { "SIGINT" } else { "SIGTERM" };
                if shutdown.is_triggered() {
                    warn!("{name} again: exiting at once (code 1)");
                    std::process::exit(i32::from(EXIT_FAILURE));
                }
                info!("{name} received: stopping once what is in flight is stored (send it again to exit at once)");
                shutdown.trigger();
            }
        })?;
    Ok(())
}

/// Runs the bridge until `shutdown` is triggered or a fatal error occurs, and returns the exit
/// code: 0 clean, 1 runtime failure, 2 configuration or set-up problem.
fn pgbridge_run(config: Config, shutdown: Shutdown) -> i32 {
    match pgbridge::run(&config, &shutdown) {
        Ok(s) => {
            info!(
                "stopped: uptime={}s wal_messages={} transactions={} changes={} published={} duplicates={} durable_lsn={} reconnects={} batches={}",
                s.wal.uptime.as_secs(),
                s.wal.wal_messages,
                s.wal.transactions,
                s.wal.changes,
                s.published,
                s.duplicates,
                s.durable,
                s.wal.reconnects,
                s.batches
            );
            0
        }
        Err(err) => {
            eprintln!("bridge: error: {err}");
            i32::from(err.exit_code())
        }
    }
}
