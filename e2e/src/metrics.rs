//! A tolerant parser for the Prometheus text exposition format, enough to sum a metric by name with
//! an optional label filter. Label order, comments, timestamps and unknown lines are all tolerated;
//! a sample line that cannot be parsed is skipped, not fatal.

use std::collections::BTreeMap;

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// All samples of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses a scrape.
    pub fn parse(text: &str) -> Self {
        Self {
            samples: text.lines().filter_map(parse_line).collect(),
        }
    }

    /// Sum of every sample named `name` whose labels include all of `filter`. Zero when none.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.matching(name, filter).map(|s| s.value).sum()
    }

    /// Whether any sample is named `name` (with any labels).
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// Samples named `name` whose labels include all of `filter`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (after the opening brace); returns the labels and the text after `}`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                other => value.push(other),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP shoal_http_requests_total Requests.
# TYPE shoal_http_requests_total counter
shoal_http_requests_total{route="blob",method="GET",status="200"} 3
shoal_http_requests_total{status="206",method="GET",route="blob"} 2
shoal_http_requests_total{method="HEAD",route="manifest",status="200"} 1 1700000000000
shoal_served_bytes_total{kind="blob"} 6.8341320e7
shoal_served_bytes_total{kind="manifest"} 509
shoal_downloads_in_flight 0
shoal_request_duration_seconds_bucket{le="+Inf"} 7
weird{a="x\"y,}z"} 4
not a sample line
# EOF
"#;

    #[test]
    fn sums_with_and_without_filters_in_any_label_order() {
        let m = Metrics::parse(SCRAPE);
        assert_eq!(m.sum("shoal_http_requests_total", &[]), 6.0);
        assert_eq!(
            m.sum("shoal_http_requests_total", &[("route", "blob")]),
            5.0
        );
        assert_eq!(
            m.sum(
                "shoal_http_requests_total",
                &[("method", "GET"), ("status", "206")]
            ),
            2.0
        );
        assert_eq!(
            m.sum("shoal_served_bytes_total", &[("kind", "blob")]),
            68_341_320.0
        );
        assert_eq!(m.sum("shoal_downloads_in_flight", &[]), 0.0);
        assert!(m.has("shoal_downloads_in_flight"));
        assert_eq!(m.sum("missing", &[]), 0.0);
    }

    #[test]
    fn escaped_label_values_and_inf() {
        let m = Metrics::parse(SCRAPE);
        assert_eq!(m.sum("weird", &[("a", "x\"y,}z")]), 4.0);
        assert_eq!(
            m.sum("shoal_request_duration_seconds_bucket", &[("le", "+Inf")]),
            7.0
        );
    }
}
