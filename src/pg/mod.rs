//! Everything that speaks to PostgreSQL: the libpq connection, the replication protocol
//! framing, the pgoutput decoder and the decoding of column values.

pub mod conn;
pub mod copy;
pub mod framing;
pub mod invalidation;
pub mod lsn;
pub mod pgoutput;
pub mod replication;
pub mod setup;
pub mod timeline;
pub mod value;

pub use lsn::Lsn;
