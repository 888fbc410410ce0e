//! The proxy's command line: flags split at NUL bytes, parsed and validated as the binary
//! does (`--images-repo` grammar, durations, sizes, addresses, files, mutually exclusive
//! flags). Validation reads the files flags name and creates a missing cache directory, so
//! the harness works in a scratch directory of its own and skips inputs with absolute
//! paths or `..`: the fuzzer must not create directories or read devices elsewhere.
//! `scripts/fuzz.sh` clears `REGISTRY_PROXY_*` variables, which would fill flags.
fn main() {
    // One fixed directory (scripts/fuzz.sh removes it): forked children may run this again.
    let scratch = std::env::temp_dir().join("registry-fuzz-config");
    std::fs::create_dir_all(&scratch).expect("a scratch directory");
    std::env::set_current_dir(&scratch).expect("entering the scratch directory");
    afl::fuzz!(|data: &[u8]| {
        let args: Vec<String> = data
            .split(|b| *b == 0)
            .take(32)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .iter()
            .any(|a| a.contains("..") || a.contains("=/") || a.starts_with('/') || a.starts_with('~'))
        {
            return;
        }
        let mut argv = vec!["registry-proxy".to_owned()];
        argv.extend(args);
        let _ = registry_proxy::fuzz::config(&argv);
    });
}
