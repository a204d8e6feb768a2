//! Command line of every binary: `<binary> [--config PATH]`.

use std::path::PathBuf;

/// The `--config PATH` argument, if given.
pub fn config_path() -> anyhow::Result<Option<PathBuf>> {
    parse(std::env::args().skip(1))
}

fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Option<PathBuf>> {
    let mut path = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                let value = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--config needs a file path"))?;
                path = Some(PathBuf::from(value));
            }
            other => match other.strip_prefix("--config=") {
                Some(value) => path = Some(PathBuf::from(value)),
                None => anyhow::bail!("unknown argument `{other}`; usage: [--config PATH]"),
            },
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> impl Iterator<Item = String> {
        list.iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn reads_the_config_flag() -> anyhow::Result<()> {
        assert_eq!(parse(args(&[]))?, None);
        assert_eq!(
            parse(args(&["--config", "a.toml"]))?,
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            parse(args(&["--config=b.toml"]))?,
            Some(PathBuf::from("b.toml"))
        );
        assert!(parse(args(&["--config"])).is_err());
        assert!(parse(args(&["--verbose"])).is_err());
        Ok(())
    }
}
