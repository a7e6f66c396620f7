#![allow(dead_code)]
//! Outside programs some tests drive (the Mosquitto clients, Node, Chromium). `bash .ci/run`
//! installs them and sets `REQUIRE_OUTSIDE_PROGRAMS=1`, so in CI a missing one fails the test;
//! elsewhere (a plain `cargo test` on a fresh machine) the test is skipped with a message
//! naming what to install.

/// Is `program` on the PATH? If not: panics under `REQUIRE_OUTSIDE_PROGRAMS=1`, otherwise prints
/// why `test` is skipped and returns false (the caller returns).
pub fn require(test: &str, program: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()));
    found || missing(test, &format!("`{program}` ({package})"))
}

/// Are the npm packages of `tests/browser` installed (mqtt.js, playwright-core)?
pub fn require_browser_packages(test: &str) -> bool {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/node_modules");
    let found = dir.join("mqtt").is_dir() && dir.join("playwright-core").is_dir();
    found
        || missing(
            test,
            "the npm packages of tests/browser (`npm ci --prefix tests/browser`)",
        )
}

/// `what` is not installed: fail under `.ci/run`, say why `test` is skipped elsewhere.
fn missing(test: &str, what: &str) -> bool {
    if std::env::var_os("REQUIRE_OUTSIDE_PROGRAMS").is_some_and(|v| v == "1") {
        panic!("{test} needs {what}, which is not installed");
    }
    eprintln!("SKIPPED {test}: needs {what}; `bash .ci/run` installs it");
    false
}
