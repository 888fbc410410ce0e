//! Reading the proxy's Prometheus text exposition.

use std::collections::HashMap;

use crate::{ProxyHandle, test_client};

/// The text exposition at `url`.
pub async fn scrape(url: &str) -> String {
    test_client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The sum over the series of `name` whose labels include all of `labels`, read from the
/// proxy's `/metrics` (0 when absent).
pub async fn metric(px: &ProxyHandle, name: &str, labels: &[(&str, &str)]) -> f64 {
    sum_metric(&scrape(&px.metrics_url("/metrics")).await, name, labels)
}

/// [`metric`] over an already scraped text.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, set) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: HashMap<&str, &str> = set
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim_matches('"')))
            .collect();
        if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}
