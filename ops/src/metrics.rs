//! A thin writer over prometheus-client's collector encoder, so each side
//! renders its existing counters at scrape time (nothing is counted twice)
//! with Prometheus names: `weir_` prefix, units in the name, `_total` on
//! counters (added by the encoder).

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Labels of one sample: (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

/// Label values escaped as the exposition format requires (`\\`, `\"`,
/// `\n`). prometheus-client 0.23 writes label values as given, and many
/// come from the other side of the link (stream names, the sender's hash
/// and counter names) or from configuration: unescaped, a `"` or a newline
/// in one would end the sample early and could forge other samples.
fn escaped(labels: &Labels) -> Labels {
    labels
        .iter()
        .map(|(k, v)| {
            if !v.contains(['\\', '"', '\n']) {
                return (*k, v.clone());
            }
            let mut e = String::with_capacity(v.len() + 8);
            for c in v.chars() {
                match c {
                    '\\' => e.push_str("\\\\"),
                    '"' => e.push_str("\\\""),
                    '\n' => e.push_str("\\n"),
                    c => e.push(c),
                }
            }
            (*k, e)
        })
        .collect()
}

/// One histogram sample set of a family (see [`Out::histograms`]).
pub struct Histogram {
    pub labels: Labels,
    pub sum: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

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
            m.encode_family(&escaped(labels))?
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
            m.encode_family(&escaped(labels))?.encode_gauge(v)?;
        }
        Ok(())
    }

    /// A histogram family, one per label set: (labels, sum, count,
    /// per-bucket counts by upper bound, not cumulative; the last bound
    /// `f64::MAX` is written as `+Inf`).
    pub fn histograms(
        &mut self,
        name: &str,
        help: &str,
        samples: &[Histogram],
    ) -> std::fmt::Result {
        if samples.is_empty() {
            return Ok(());
        }
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for h in samples {
            m.encode_family(&escaped(&h.labels))?
                .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Hostile;

    impl prometheus_client::collector::Collector for Hostile {
        fn encode(&self, enc: DescriptorEncoder) -> std::fmt::Result {
            let mut out = Out::new(enc);
            let name = "a\"} 1\nweir_forged 1\n#\\".to_string();
            out.gauges("g", "a gauge", &[(vec![("stream", name.clone())], 2.0)])?;
            out.counters("c", "a counter", &[(vec![("stream", name.clone())], 3)])?;
            out.histograms(
                "h_seconds",
                "a histogram",
                &[Histogram {
                    labels: vec![("stream", name)],
                    sum: 1.0,
                    count: 1,
                    buckets: vec![(1.0, 1), (f64::MAX, 0)],
                }],
            )
        }
    }

    #[test]
    fn a_label_value_with_quotes_and_newlines_cannot_forge_samples() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Hostile));
        let text = String::from_utf8(render(&registry)).unwrap();
        assert!(
            !text.lines().any(|l| l.starts_with("weir_forged")),
            "{text}"
        );
        let value = r#"stream="a\"} 1\nweir_forged 1\n#\\""#;
        assert!(text.contains(&format!("g{{{value}}} 2")), "{text}");
        assert!(text.contains(&format!("c_total{{{value}}} 3")), "{text}");
        assert!(
            text.contains(&format!("h_seconds_count{{{value}}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("h_seconds_bucket{{le=\"+Inf\",{value}}} 1"))
                || text.contains(&format!("h_seconds_bucket{{{value},le=\"+Inf\"}} 1")),
            "{text}"
        );
    }
}
