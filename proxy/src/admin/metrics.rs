//! `GET /metrics`: a prometheus-client collector that encodes, at scrape
//! time, the sum of every worker's own counters. Nothing is registered per
//! connection and no metric is shared by the workers.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::Shared;
use crate::stats::{self, ConnectFailure, HistogramTotal, Refused, WorkerStats};

pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Workers(shared)));
    registry
}

/// The Prometheus text format (0.0.4) of everything `registry` holds.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?;
    Ok(text)
}

struct Workers(Arc<Shared>);

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Workers")
    }
}

impl Collector for Workers {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        let workers = &shared.stats;
        let total = |counter: fn(&WorkerStats) -> &std::sync::atomic::AtomicU64| {
            stats::total(workers, counter)
        };
        // Closed read before opened: a connection is opened before it
        // closes, so the difference is never negative.
        let closed = total(|s| &s.closed);
        let opened = total(|s| &s.opened);

        counter(
            &mut encoder,
            "sluice_connections_opened",
            "Connections forwarded to the workload (the upstream connect succeeded).",
            opened,
        )?;
        counter(
            &mut encoder,
            "sluice_connections_closed",
            "Forwarded connections that ended, cleanly or not.",
            closed,
        )?;
        gauge(
            &mut encoder,
            "sluice_connections_active",
            "Connections being forwarded now (opened - closed).",
            i64::try_from(opened.saturating_sub(closed)).unwrap_or(i64::MAX),
        )?;
        counter(
            &mut encoder,
            "sluice_connections_accepted",
            "Intercepted connections accepted, whatever became of them.",
            total(|s| &s.accepted),
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "sluice_bytes",
                "Bytes forwarded, by direction.",
                None,
                MetricType::Counter,
            )?;
            for (direction, bytes) in [
                ("to_workload", total(|s| &s.bytes_to_workload)),
                ("to_client", total(|s| &s.bytes_to_client)),
            ] {
                ConstCounter::new(bytes)
                    .encode(family.encode_family(&[("direction", direction)])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "sluice_connections_refused",
                "Intercepted connections reset without being forwarded, by reason.",
                None,
                MetricType::Counter,
            )?;
            for reason in Refused::ALL {
                let count = stats::total(workers, |s| &s.refused[reason as usize]);
                ConstCounter::new(count)
                    .encode(family.encode_family(&[("reason", reason.label())])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "sluice_upstream_connect_failures",
                "Connections to the workload that failed (the client was reset), by reason.",
                None,
                MetricType::Counter,
            )?;
            for reason in ConnectFailure::ALL {
                let count = stats::total(workers, |s| &s.connect_failures[reason as usize]);
                ConstCounter::new(count)
                    .encode(family.encode_family(&[("reason", reason.label())])?)?;
            }
        }
        counter(
            &mut encoder,
            "sluice_idle_timeouts",
            "Connections reset for moving no byte for --idle-timeout.",
            total(|s| &s.idle_timeouts),
        )?;
        counter(
            &mut encoder,
            "sluice_forwarder_fallbacks",
            "Connections the sockmap forwarder could not take, forwarded with copy.",
            total(|s| &s.forwarder_fallbacks),
        )?;
        counter(
            &mut encoder,
            "sluice_sockmap_joined",
            "Connections the sockmap forwarder joined in the kernel (the others ended on copy before --sockmap-after).",
            total(|s| &s.sockmap_joined),
        )?;
        counter(
            &mut encoder,
            "sluice_sockmap_held_back",
            "Times a joined connection's direction stopped redirecting because its reader was 8 MiB behind (a slow workload or client); its bytes waited in TCP's window until the reader caught up. Counted when the connection ends.",
            total(|s| &s.sockmap_held_back),
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "sluice_client_source_fallbacks",
                "Connections that reached the workload from the bypass source (127.0.0.6 / ::6) although --upstream-source client asked for the client's address, by reason (workload_not_on_inner_address: it listens on the pod's address only; GET /config_dump lists the destinations).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(total(|s| &s.client_source_fallbacks))
                .encode(family.encode_family(&[("reason", "workload_not_on_inner_address")])?)?;
        }
        histogram(
            &mut encoder,
            "sluice_upstream_connect_duration",
            "Time to connect to the workload.",
            stats::histogram_total(workers, |s| &s.connect_duration),
        )?;
        histogram(
            &mut encoder,
            "sluice_connection_duration",
            "Lifetime of forwarded connections, from the upstream connect to the end.",
            stats::histogram_total(workers, |s| &s.connection_duration),
        )?;
        gauge(
            &mut encoder,
            "sluice_draining",
            "1 while sluice drains (stopping: new connections are refused).",
            i64::from(shared.draining()),
        )?;
        gauge(
            &mut encoder,
            "sluice_workers",
            "Data-path worker threads.",
            i64::try_from(workers.len()).unwrap_or(i64::MAX),
        )?;
        {
            let mut info = encoder.encode_descriptor(
                "sluice_build_info",
                "Version, interception mode and forwarder in use (1).",
                None,
                MetricType::Gauge,
            )?;
            let mode = shared.mode.to_string();
            let forwarder = format!("{:?}", shared.forwarder).to_lowercase();
            let labels = [
                ("version", env!("CARGO_PKG_VERSION")),
                ("mode", mode.as_str()),
                ("forwarder", forwarder.as_str()),
            ];
            ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    total: HistogramTotal,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        total.sum_seconds,
        total.count,
        &total.buckets,
        None,
    )
}
