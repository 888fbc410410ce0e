//! Shared helpers of the fuzz targets in `src/bin/`.

/// The input as UTF-8, lossily: every parser here takes text that arrived as bytes.
pub fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}
