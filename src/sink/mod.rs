//! Where the pipeline delivers changes: the `Sink` trait, the seam between the broker-neutral
//! pipeline and a broker, and its NATS JetStream implementation ([`nats`]).

pub(crate) mod driver;
#[cfg(feature = "kafka")]
pub(crate) mod kafka;
pub mod nats;
pub mod ring;

use crate::shutdown::Shutdown;
use crate::sink::ring::RingReader;
use crate::telemetry::counters::DurableLsn;

use driver::Delivery;

/// A destination of changes. The supervisor runs one on a thread of its own, inside a
/// current-thread tokio runtime:
///
/// 1. [`Sink::prepare`], once, before any WAL is read (nothing could be made durable before
///    the destination is ready): connect, make sure the destination exists (streams, topics)
///    and check its settings, retrying what a retry can fix until shutdown. It needs nothing
///    from PostgreSQL, so the supervisor runs it while PostgreSQL is being set up.
/// 2. [`Sink::run`], with the [`Origin`] PostgreSQL's set-up found: the broker-neutral [`driver`] takes the changes off the ring in order and
///    hands them to the sink's [`Delivery`] (encode, send, resend, report delivery progress);
///    it advances the durable position to a transaction's end only once every change up to it
///    is delivered, gives delivered events back through the ring for reuse and the popped bytes
///    to its budget, and keeps the counters in telemetry. It returns once the ring is closed
///    (its End item, or the wal side dropped) and everything taken is delivered, or when
///    delivering fails for good.
///
/// The supervisor holds the concrete type, and the driver is generic over the delivery, so the
/// per-change path is monomorphized: no dynamic call per change.
pub(crate) trait Sink: Send + 'static {
    /// Why the destination could not be made ready.
    type PrepareError: std::error::Error + Send + 'static;
    /// Why delivering stopped.
    type Error: std::error::Error + Send + 'static;
    /// The broker's half of delivering (see [`Delivery`] for what it must guarantee).
    type Delivery: Delivery<Error = Self::Error>;

    /// Makes the destination ready; `Ok(false)` when shutdown came first. An error is one a
    /// retry cannot fix (a configuration problem): the start fails with it.
    async fn prepare(&mut self, shutdown: &Shutdown) -> Result<bool, Self::PrepareError>;

    /// The delivering half, once [`Sink::prepare`] returned `Ok(true)`, for changes of `origin`.
    fn delivery(self, origin: Origin, shutdown: Shutdown) -> Result<Self::Delivery, Self::Error>;

    /// Delivers what comes through `ring` until it is closed and drained, advancing `durable`.
    /// Called only after [`Sink::prepare`] returned `Ok(true)`.
    async fn run(
        self,
        ring: RingReader,
        durable: DurableLsn,
        origin: Origin,
        shutdown: Shutdown,
    ) -> Result<(), Self::Error>
    where
        Self: Sized,
    {
        driver::run(self.delivery(origin, shutdown)?, ring, durable).await
    }
}

/// Where the changes come from, known only once PostgreSQL is set up: what message ids and
/// exactly-once positions are derived from.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    /// Namespace of the message ids (configured, or derived from the server and publication).
    pub(crate) id_namespace: String,
    /// The cluster's system identifier (`IDENTIFY_SYSTEM`), decimal.
    // Read by the Kafka sink's exactly-once delivery only.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) system_id: String,
    /// The replication slot.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) slot: String,
    /// The server's WAL position and timeline history as of the latest (re)connect.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) server: std::sync::Arc<crate::pg::timeline::ServerPosition>,
}
