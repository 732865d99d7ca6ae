//! A thin writer over prometheus-client's collector encoder, so each side
//! renders its existing counters at scrape time (nothing is counted twice)
//! with Prometheus names: `weir_` prefix, units in the name, `_total` on
//! counters (added by the encoder).

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Labels of one sample: (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

/// Writes metric families into a scrape.
pub struct Out<'a> {
    enc: DescriptorEncoder<'a>,
}

impl<'a> Out<'a> {
    pub fn new(enc: DescriptorEncoder<'a>) -> Self {
        Out { enc }
    }

    /// A counter without labels; `name` without `_total`.
    pub fn counter(&mut self, name: &str, help: &str, v: u64) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        m.encode_counter::<NoLabelSet, _, u64>(&v, None)
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: f64) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        m.encode_gauge(&v)
    }

    /// A counter family, one sample per label set.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Labels, u64)],
    ) -> std::fmt::Result {
        if samples.is_empty() {
            return Ok(());
        }
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in samples {
            m.encode_family(labels)?
                .encode_counter::<NoLabelSet, _, u64>(v, None)?;
        }
        Ok(())
    }

    /// A gauge family, one sample per label set.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Labels, f64)],
    ) -> std::fmt::Result {
        if samples.is_empty() {
            return Ok(());
        }
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in samples {
            m.encode_family(labels)?.encode_gauge(v)?;
        }
        Ok(())
    }

    /// `weir_build_info{side, version}` 1.
    pub fn build_info(&mut self, side: &str, version: &str) -> std::fmt::Result {
        let mut m = self.enc.encode_descriptor(
            "build",
            "the running binary: side and version",
            None,
            MetricType::Info,
        )?;
        m.encode_info(&vec![
            ("side", side.to_string()),
            ("version", version.to_string()),
        ])
    }
}

/// Renders a registry as Prometheus (OpenMetrics) text.
pub fn render(registry: &prometheus_client::registry::Registry) -> Vec<u8> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("writing to a String");
    text.into_bytes()
}
