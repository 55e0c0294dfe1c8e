//! The two formats `/metrics` is served in, which one a scraper asked for, and the conversion
//! between them.
//!
//! The registry encodes OpenMetrics 1.0.0 only. A scraper that asks for it (Prometheus does, in
//! its `Accept`) gets that; anyone else gets the Prometheus text format 0.0.4, converted from the
//! same text, so that both describe one reading of the counters. The formats differ in a few
//! well-defined places, all in [`to_text_004`]. Nothing here runs on the request path: only at
//! scrape time.

/// An exposition format, with the content type that says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0: counter families named without `_total`, ends with `# EOF`.
    OpenMetrics,
    /// The Prometheus text format 0.0.4: counters named with `_total` everywhere, no `# EOF`.
    Text004,
}

impl Format {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format to answer an `Accept` header with (`None`: no header). OpenMetrics when a
    /// media range `application/openmetrics-text` (without a version, or version 1.0.0) has a
    /// q-value above 0 and no lower than any range the text format matches (`text/plain`,
    /// `text/*`, `*/*`); otherwise the 0.0.4 text, which is also the answer to a client that
    /// accepts neither (it is what `/metrics` has always served).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text004;
        };
        let mut openmetrics = 0.0f32;
        let mut text = 0.0f32;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut q = 1.0f32;
            let mut version = None;
            for param in parts {
                let Some((key, value)) = param.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match key.trim().to_ascii_lowercase().as_str() {
                    // A malformed q-value makes the range unacceptable rather than preferred.
                    "q" => q = value.parse::<f32>().unwrap_or(0.0).clamp(0.0, 1.0),
                    "version" => version = Some(value.to_string()),
                    _ => {}
                }
            }
            match media.as_str() {
                "application/openmetrics-text" if matches!(version.as_deref(), None | Some("1.0.0")) => {
                    openmetrics = openmetrics.max(q)
                }
                "text/plain" if matches!(version.as_deref(), None | Some("0.0.4")) => text = text.max(q),
                "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text004
        }
    }
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition:
///
/// - a counter family's `# HELP` and `# TYPE` name it with its samples' `_total` suffix, and its
///   `_created` samples (0.0.4 has no place for them) are left out;
/// - an `info` family becomes a gauge named after its `_info` samples; a `stateset` becomes a
///   gauge; a `gaugehistogram` or `unknown` family is `untyped`;
/// - `# UNIT` lines, exemplars and the closing `# EOF` are left out.
///
/// Sample lines are otherwise the same in both formats (label escaping, `le="+Inf"`, numbers).
pub fn to_text_004(openmetrics: &str) -> String {
    use std::collections::HashMap;
    // Each family's type, from its `# TYPE` line, which follows its `# HELP` line.
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let renamed = |family: &str| -> String {
        match types.get(family).copied() {
            Some("counter") => format!("{family}_total"),
            Some("info") => format!("{family}_info"),
            _ => family.to_string(),
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (family, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", renamed(family)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = match kind {
                "counter" | "gauge" | "histogram" | "summary" => kind,
                "info" | "stateset" => "gauge",
                _ => "untyped",
            };
            out.push_str(&format!("# TYPE {} {kind}\n", renamed(family)));
        } else if line.starts_with('#') {
            // `# UNIT`, `# EOF`: nothing in 0.0.4 says them.
        } else if !line.is_empty() {
            let (name, labels, after) = split_sample(line);
            let created_of_counter = name
                .strip_suffix("_created")
                .is_some_and(|family| matches!(types.get(family).copied(), Some("counter" | "histogram" | "summary")));
            if created_of_counter {
                continue;
            }
            // An exemplar follows the value (and timestamp) after " # ".
            let value = after.split_once(" # ").map_or(after, |(value, _)| value);
            out.push_str(name);
            out.push_str(labels);
            out.push_str(value);
            out.push('\n');
        }
    }
    out
}

/// A sample line's name, its label set (`{...}`, or empty) and what follows (value, timestamp,
/// exemplar). A label value may hold any character, escaped quotes included, so the end of the
/// label set is found by reading them.
fn split_sample(line: &str) -> (&str, &str, &str) {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let (name, rest) = line.split_at(name_end);
    if !rest.starts_with('{') {
        return (name, "", rest);
    }
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => {
                let (labels, after) = rest.split_at(i + 1);
                return (name, labels, after);
            }
            _ => {}
        }
    }
    (name, rest, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn openmetrics_only_when_asked_for_at_least_as_much_as_the_text_format() {
        let cases = [
            (None, Format::Text004),
            (Some(""), Format::Text004),
            (Some("*/*"), Format::Text004),
            (Some("text/plain"), Format::Text004),
            (Some("text/plain;version=0.0.4"), Format::Text004),
            (Some(PROMETHEUS_ACCEPT), Format::OpenMetrics),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; Version=\"1.0.0\"; q=0.9"),
                Format::OpenMetrics,
            ),
            (
                Some("text/plain;q=0.5, application/openmetrics-text;q=0.6"),
                Format::OpenMetrics,
            ),
            (
                Some("text/plain;q=0.7, application/openmetrics-text;q=0.6"),
                Format::Text004,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Text004),
            (Some("application/openmetrics-text;q=x"), Format::Text004),
            // A version this server does not speak.
            (Some("application/openmetrics-text;version=0.0.1"), Format::Text004),
            (
                Some("application/openmetrics-text;version=2.0.0,text/plain;q=0.5"),
                Format::Text004,
            ),
            (Some("application/json"), Format::Text004),
        ];
        for (accept, want) in cases {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn the_text_format_names_counters_with_total_and_leaves_out_what_it_cannot_say() {
        let openmetrics = concat!(
            "# HELP cutover_requests Requests answered.\n",
            "# TYPE cutover_requests counter\n",
            "cutover_requests_total{service=\"web\",class=\"2xx\"} 3\n",
            "cutover_requests_created{service=\"web\",class=\"2xx\"} 1700000000.0\n",
            "# HELP cutover_request_duration_seconds Time to the response head.\n",
            "# TYPE cutover_request_duration_seconds histogram\n",
            "# UNIT cutover_request_duration_seconds seconds\n",
            "cutover_request_duration_seconds_sum{service=\"web\"} 0.5\n",
            "cutover_request_duration_seconds_count{service=\"web\"} 3\n",
            "cutover_request_duration_seconds_bucket{le=\"1.0\",service=\"web\"} 3 # {trace=\"a\"} 0.2\n",
            "cutover_request_duration_seconds_bucket{le=\"+Inf\",service=\"web\"} 3\n",
            "# HELP cutover_live The live colour.\n",
            "# TYPE cutover_live gauge\n",
            "cutover_live{service=\"web\",version=\"v2 # } \\\" {x}\"} 1\n",
            "# HELP cutover_build Build.\n",
            "# TYPE cutover_build info\n",
            "cutover_build_info{version=\"1\"} 1\n",
            "# EOF\n",
        );
        let want = concat!(
            "# HELP cutover_requests_total Requests answered.\n",
            "# TYPE cutover_requests_total counter\n",
            "cutover_requests_total{service=\"web\",class=\"2xx\"} 3\n",
            "# HELP cutover_request_duration_seconds Time to the response head.\n",
            "# TYPE cutover_request_duration_seconds histogram\n",
            "cutover_request_duration_seconds_sum{service=\"web\"} 0.5\n",
            "cutover_request_duration_seconds_count{service=\"web\"} 3\n",
            "cutover_request_duration_seconds_bucket{le=\"1.0\",service=\"web\"} 3\n",
            "cutover_request_duration_seconds_bucket{le=\"+Inf\",service=\"web\"} 3\n",
            "# HELP cutover_live The live colour.\n",
            "# TYPE cutover_live gauge\n",
            "cutover_live{service=\"web\",version=\"v2 # } \\\" {x}\"} 1\n",
            "# HELP cutover_build_info Build.\n",
            "# TYPE cutover_build_info gauge\n",
            "cutover_build_info{version=\"1\"} 1\n",
        );
        assert_eq!(to_text_004(openmetrics), want);
    }
}
