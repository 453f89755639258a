//! OpenMetrics 1.0 text exposition, for scrapers that ask for it (Prometheus does, in its
//! Accept header). The prometheus crate only writes the older text format, so the families
//! it gathers are written out here.

use std::fmt::Write as _;

use prometheus::proto::{LabelPair, MetricFamily, MetricType};

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Does this Accept header prefer OpenMetrics to the text format?
pub fn wanted(accept: &str) -> bool {
    let mut openmetrics = 0.0_f32;
    let mut text = 0.0_f32;
    for range in accept.split(',') {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or_default().to_ascii_lowercase();
        let q = params
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

pub fn encode(families: &[MetricFamily]) -> String {
    let mut out = String::new();
    for family in families.iter().filter(|f| !f.get_metric().is_empty()) {
        let name = family.name();
        let kind = family.get_field_type();
        // A counter family is named without its samples' `_total` suffix.
        let family_name = match kind {
            MetricType::COUNTER => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let type_name = match kind {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::HISTOGRAM => "histogram",
            // flyprobe exports neither.
            MetricType::SUMMARY | MetricType::UNTYPED => continue,
        };
        let _ = writeln!(out, "# TYPE {family_name} {type_name}");
        let _ = writeln!(out, "# HELP {family_name} {}", escape(family.help()));
        for metric in family.get_metric() {
            let labels = metric.get_label();
            match kind {
                MetricType::COUNTER => sample(
                    &mut out,
                    &format!("{family_name}_total"),
                    labels,
                    None,
                    metric.get_counter().get_value(),
                ),
                MetricType::GAUGE => {
                    sample(&mut out, name, labels, None, metric.get_gauge().get_value())
                }
                MetricType::HISTOGRAM => {
                    let h = metric.get_histogram();
                    let bucket = format!("{name}_bucket");
                    for b in h.get_bucket() {
                        let le = float(b.upper_bound());
                        sample(
                            &mut out,
                            &bucket,
                            labels,
                            Some(&le),
                            b.cumulative_count() as f64,
                        );
                    }
                    let count = h.get_sample_count() as f64;
                    sample(&mut out, &bucket, labels, Some("+Inf"), count);
                    sample(&mut out, &format!("{name}_count"), labels, None, count);
                    sample(
                        &mut out,
                        &format!("{name}_sum"),
                        labels,
                        None,
                        h.get_sample_sum(),
                    );
                }
                // Skipped above: flyprobe exports neither.
                MetricType::SUMMARY | MetricType::UNTYPED => {}
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

fn sample(out: &mut String, name: &str, labels: &[LabelPair], le: Option<&str>, value: f64) {
    out.push_str(name);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        let pairs = labels
            .iter()
            .map(|l| (l.name(), l.value()))
            .chain(le.map(|le| ("le", le)));
        for (k, v) in pairs {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", float(value));
}

/// OpenMetrics numbers: integers without a fraction, `+Inf`/`-Inf`/`NaN` spelled out.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_accept_header_gets_openmetrics() {
        assert!(wanted(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(!wanted("text/plain;version=0.0.4"));
        assert!(!wanted("*/*"));
        assert!(!wanted(""));
        assert!(!wanted("application/openmetrics-text;q=0"));
        assert!(!wanted("text/plain,application/openmetrics-text;q=0.5"));
    }

    #[test]
    fn numbers_and_escapes() {
        assert_eq!(float(3.0), "3");
        assert_eq!(float(0.0025), "0.0025");
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
