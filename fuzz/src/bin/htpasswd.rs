//! htpasswd files (format only; no bcrypt work per line).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(h) = registry_auth::client::Htpasswd::from_bytes(data) {
            assert_eq!(h.is_empty(), h.len() == 0);
        }
    });
}
