//! Command line of every service binary: `<binary> [--config PATH]`, plus `--help` and
//! `--version`, parsed by clap so a wrong argument prints usage and exits 2.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser};

/// How settings reach a service besides the file; shown at the end of every `--help`.
pub const CONFIG_HELP: &str = "\
Configuration: defaults, then the TOML file given with --config (every key is documented in
config/local.example.toml), then environment overrides named BRIDGE__SECTION__KEY, e.g.
BRIDGE__REDIS__URL=redis://127.0.0.1:6380 or BRIDGE__GATEWAY__ADDR=0.0.0.0:8080.
The whole file is validated at start; an invalid key is named in the error.";

/// The arguments every service takes.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
pub struct ServiceArgs {
    /// TOML settings file shared by every service (optional: defaults and environment
    /// overrides alone are enough).
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// Parses the process's arguments for the binary `name`. `--help` and `--version` print and
/// exit 0; a wrong argument prints the usage on stderr and exits 2 (clap's convention), never
/// with an error backtrace.
pub fn parse(name: &'static str, version: &'static str, about: &'static str) -> ServiceArgs {
    let matches = command(name, version, about).get_matches();
    ServiceArgs::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

/// The clap command of a service binary (also for tests: `try_get_matches_from`).
pub fn command(name: &'static str, version: &'static str, about: &'static str) -> clap::Command {
    ServiceArgs::command()
        .name(name)
        .bin_name(name)
        .version(version)
        .about(about)
        .after_help(CONFIG_HELP)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_from(args: &[&str]) -> Result<ServiceArgs, clap::Error> {
        let matches = command("svc", "0.0.0", "test").try_get_matches_from(args)?;
        ServiceArgs::from_arg_matches(&matches)
    }

    #[test]
    fn reads_the_config_flag_in_every_spelling() -> anyhow::Result<()> {
        assert_eq!(parse_from(&["svc"])?.config, None);
        for args in [
            &["svc", "--config", "a.toml"][..],
            &["svc", "--config=a.toml"],
            &["svc", "-c", "a.toml"],
        ] {
            assert_eq!(parse_from(args)?.config, Some(PathBuf::from("a.toml")));
        }
        Ok(())
    }

    #[test]
    fn a_wrong_argument_is_a_usage_error() {
        for args in [
            &["svc", "--config"][..],
            &["svc", "--verbose"],
            &["svc", "x"],
        ] {
            let error = parse_from(args).err();
            assert_eq!(error.map(|e| e.exit_code()), Some(2), "{args:?}");
        }
    }

    #[test]
    fn help_names_the_config_flag_and_the_environment_override() {
        let help = command("svc", "0.0.0", "test")
            .render_long_help()
            .to_string();
        assert!(help.contains("--config <PATH>"), "{help}");
        assert!(help.contains("BRIDGE__SECTION__KEY"), "{help}");
    }
}
