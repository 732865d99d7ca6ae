//! What both weir binaries need to run for years as services, kept out of
//! their pipelines: the read-only management endpoint (`[metrics] listen`,
//! Prometheus text at `/metrics`), systemd notification (READY, STOPPING,
//! WATCHDOG only while every thread that matters is alive), the log
//! filter that SIGHUP reloads and the credential files it re-reads.

pub mod http;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod reload;
