//! Every binary's command line: `--help` and `--version` answer, a wrong argument prints the
//! usage on stderr and exits 2, without an error backtrace.

use std::process::Output;

use test_support::bin_path;

/// Every binary of the workspace that a person starts by hand.
const BINARIES: [&str; 5] = ["gateway", "producer", "processor", "mock-llm", "bench"];

fn run(binary: &str, args: &[&str]) -> anyhow::Result<Output> {
    Ok(std::process::Command::new(bin_path(binary)?)
        .args(args)
        // A backtrace would show up only with this set: prove there is none even then.
        .env("RUST_BACKTRACE", "1")
        .output()?)
}

#[test]
fn every_binary_explains_its_command_line() -> anyhow::Result<()> {
    for binary in BINARIES {
        let help = run(binary, &["--help"])?;
        let text = String::from_utf8_lossy(&help.stdout);
        assert_eq!(help.status.code(), Some(0), "{binary} --help: {help:?}");
        assert!(text.contains("Usage:"), "{binary} --help: {text}");
        assert!(
            text.contains("BRIDGE__SECTION__KEY"),
            "{binary} --help: {text}"
        );
        if binary != "bench" {
            // bench writes the settings of the stack it starts; it takes no settings file.
            assert!(text.contains("--config <PATH>"), "{binary} --help: {text}");
        }
    }
    Ok(())
}

#[test]
fn every_binary_tells_its_version() -> anyhow::Result<()> {
    for binary in BINARIES {
        let version = run(binary, &["--version"])?;
        let text = String::from_utf8_lossy(&version.stdout);
        assert_eq!(version.status.code(), Some(0), "{binary} --version");
        assert_eq!(
            text.trim(),
            format!("{binary} {}", env!("CARGO_PKG_VERSION")),
            "{binary} --version"
        );
    }
    Ok(())
}

#[test]
fn a_wrong_argument_prints_usage_and_exits_2() -> anyhow::Result<()> {
    for binary in BINARIES {
        let output = run(binary, &["--no-such-flag"])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{binary}: {stderr}");
        assert!(stderr.contains("--no-such-flag"), "{binary}: {stderr}");
        assert!(stderr.contains("Usage:"), "{binary}: {stderr}");
        assert!(!stderr.contains("backtrace"), "{binary}: {stderr}");
        assert!(!stderr.contains("Error:"), "{binary}: {stderr}");
        assert!(output.stdout.is_empty(), "{binary}: nothing on stdout");
    }
    Ok(())
}
