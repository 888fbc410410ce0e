//! Which part of a blob a request asks for (RFC 9110 §14), and its preconditions.
//!
//! The `headers` crate decodes `Range` and `If-Range`, but its `satisfiable_ranges`
//! drops a last position too large for `u64` and a suffix longer than the blob, which
//! RFC 9110 §14.1.2 says mean "to the end" and "the whole representation"; the byte
//! arithmetic is therefore done here, on the already validated header value.

use headers::{ETag, HeaderMapExt as _, IfNoneMatch, IfRange};
use http::{HeaderMap, header};

/// What to send of a representation of `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wanted {
    /// 200 with everything: no `Range`, several ranges (RFC 9110 allows ignoring them),
    /// an `If-Range` that does not match, or a `Range` that is not valid syntax.
    All,
    /// 206 with `start..=end`.
    Range(u64, u64),
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// The strong ETag of content named by `digest`: the digest itself, quoted.
pub(crate) fn etag_for(digest: &str) -> Option<ETag> {
    format!("\"{digest}\"").parse().ok()
}

/// Whether `If-None-Match` says the client already holds the content with `etag` (answer
/// 304). A header that does not parse is ignored, as RFC 9110 §13.1.2 allows.
pub(crate) fn not_modified(headers: &HeaderMap, etag: &ETag) -> bool {
    headers
        .typed_get::<IfNoneMatch>()
        .is_some_and(|inm| !inm.precondition_passes(etag))
}

/// The part of a representation of `len` bytes with `etag` that the request asks for.
pub(crate) fn wanted(headers: &HeaderMap, len: u64, etag: Option<&ETag>) -> Wanted {
    if headers.typed_get::<headers::Range>().is_none() {
        return Wanted::All;
    }
    // An If-Range that does not strongly match (or is a date: there is no
    // Last-Modified) turns the request into a plain GET (RFC 9110 §13.1.5).
    if headers.contains_key(header::IF_RANGE) {
        match headers.typed_get::<IfRange>() {
            Some(ir) if !ir.is_modified(etag, None) => {}
            _ => return Wanted::All,
        }
    }
    match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(v) => parse(v, len),
        None => Wanted::All,
    }
}

/// RFC 9110 §14.1.2 arithmetic on a `Range` value: one satisfiable range is served, an
/// unsatisfiable single range is 416, several ranges or bad syntax are the whole thing.
pub(crate) fn parse(value: &str, len: u64) -> Wanted {
    let Some((unit, set)) = value.split_once('=') else {
        return Wanted::All;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Wanted::All;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return Wanted::All;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return Wanted::All;
    };
    let (first, last) = (first.trim(), last.trim());
    match (first.is_empty(), last.is_empty()) {
        // `-N`: the last N bytes; a suffix longer than the blob is the whole blob.
        (true, false) => match number(last) {
            Some(0) => Wanted::Unsatisfiable,
            Some(n) if len > 0 => Wanted::Range(len.saturating_sub(n), len - 1),
            Some(_) => Wanted::Unsatisfiable,
            None => Wanted::All,
        },
        // `N-` or `N-M`: M past the end (even past u64) means the end.
        (false, _) => {
            let Some(start) = number(first) else {
                return Wanted::All;
            };
            let end = if last.is_empty() {
                u64::MAX
            } else {
                match number(last) {
                    Some(e) => e,
                    None => return Wanted::All,
                }
            };
            if end < start {
                return Wanted::All;
            }
            if start >= len {
                return Wanted::Unsatisfiable;
            }
            Wanted::Range(start, end.min(len - 1))
        }
        (true, true) => Wanted::All,
    }
}

/// A run of ASCII digits; a value past `u64::MAX` saturates (it can only mean "beyond any
/// length"). `None` for anything else.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn rfc9110_cases() {
        assert_eq!(parse("bytes=10-19", 100), Wanted::Range(10, 19));
        assert_eq!(parse("bytes=90-", 100), Wanted::Range(90, 99));
        assert_eq!(parse("bytes=-5", 100), Wanted::Range(95, 99));
        assert_eq!(
            parse("bytes=0-99999999999999999999999", 100),
            Wanted::Range(0, 99)
        );
        assert_eq!(parse("bytes=0-1000", 100), Wanted::Range(0, 99));
        assert_eq!(parse("bytes=-1000", 100), Wanted::Range(0, 99));
        assert_eq!(
            parse("bytes=-99999999999999999999999", 100),
            Wanted::Range(0, 99)
        );
        assert_eq!(parse("bytes=100-", 100), Wanted::Unsatisfiable);
        assert_eq!(parse("bytes=200-300", 100), Wanted::Unsatisfiable);
        assert_eq!(parse("bytes=-0", 100), Wanted::Unsatisfiable);
        assert_eq!(parse("bytes=0-", 0), Wanted::Unsatisfiable);
        assert_eq!(parse("bytes=0-1,5-6", 100), Wanted::All);
        assert_eq!(parse("bytes=5-1", 100), Wanted::All);
        assert_eq!(parse("items=0-1", 100), Wanted::All);
        assert_eq!(parse("bytes=a-b", 100), Wanted::All);
        assert_eq!(parse("bytes=+1-2", 100), Wanted::All);
    }

    #[test]
    fn if_range_and_if_none_match_use_the_digest() {
        let tag = etag_for("sha256:abc").unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=1-2"));
        assert_eq!(wanted(&h, 10, Some(&tag)), Wanted::Range(1, 2));
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"sha256:abc\""));
        assert_eq!(wanted(&h, 10, Some(&tag)), Wanted::Range(1, 2));
        h.insert(
            header::IF_RANGE,
            HeaderValue::from_static("\"sha256:other\""),
        );
        assert_eq!(wanted(&h, 10, Some(&tag)), Wanted::All);
        h.insert(
            header::IF_RANGE,
            HeaderValue::from_static("W/\"sha256:abc\""),
        );
        assert_eq!(
            wanted(&h, 10, Some(&tag)),
            Wanted::All,
            "weak never matches"
        );
        h.insert(
            header::IF_RANGE,
            HeaderValue::from_static("Tue, 01 Dec 2026 10:00:00 GMT"),
        );
        assert_eq!(wanted(&h, 10, Some(&tag)), Wanted::All);

        let mut h = HeaderMap::new();
        assert!(!not_modified(&h, &tag));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", \"sha256:abc\""),
        );
        assert!(not_modified(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(not_modified(&h, &tag));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"sha256:other\""),
        );
        assert!(!not_modified(&h, &tag));
    }

    proptest! {
        #[test]
        fn a_served_range_is_inside_the_blob(value in "\\PC{0,40}", len in 0u64..1_000_000) {
            match parse(&value, len) {
                Wanted::Range(s, e) => prop_assert!(s <= e && e < len),
                Wanted::All | Wanted::Unsatisfiable => {}
            }
        }

        #[test]
        fn first_last_ranges(s in 0u64..2000, e in 0u64..2000, len in 0u64..1000) {
            let got = parse(&format!("bytes={s}-{e}"), len);
            let want = if e < s { Wanted::All } else if s >= len { Wanted::Unsatisfiable } else { Wanted::Range(s, e.min(len - 1)) };
            prop_assert_eq!(got, want);
        }
    }
}
