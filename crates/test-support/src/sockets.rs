//! A process's TCP sockets, read from Linux's `/proc`: the harness asks whether a child
//! listens on its port, the bench counts a service's connections to Redis.

use std::collections::HashSet;

use anyhow::Context;

/// A TCP state as `/proc/net/tcp` writes it (hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    Established,
    Listen,
    Other,
}

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    pub state: TcpState,
    /// Matches the `socket:[<inode>]` link of the descriptors that hold it.
    pub inode: String,
}

/// Every IPv4 and IPv6 TCP socket of this network namespace. Columns:
/// `sl local_address rem_address st … uid timeout inode`, a port in hex after the colon.
pub fn tcp_sockets() -> anyhow::Result<Vec<TcpSocket>> {
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            // A kernel without IPv6 has no tcp6 table.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error).with_context(|| format!("reading {table}")),
        };
        sockets.extend(text.lines().skip(1).filter_map(parse_row));
    }
    Ok(sockets)
}

fn parse_row(line: &str) -> Option<TcpSocket> {
    let columns: Vec<&str> = line.split_whitespace().collect();
    let port = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
    };
    Some(TcpSocket {
        local_port: port(columns.get(1)?)?,
        remote_port: port(columns.get(2)?)?,
        state: match *columns.get(3)? {
            "01" => TcpState::Established,
            "0A" => TcpState::Listen,
            _ => TcpState::Other,
        },
        inode: (*columns.get(9)?).to_owned(),
    })
}

/// Inodes of the sockets process `pid` holds open, from its `/proc/<pid>/fd` links.
pub fn socket_inodes(pid: u32) -> anyhow::Result<HashSet<String>> {
    let fd_dir = format!("/proc/{pid}/fd");
    let fds = std::fs::read_dir(&fd_dir).with_context(|| format!("listing {fd_dir}"))?;
    // A descriptor closed while we look is simply not counted.
    Ok(fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            let inode = target.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_owned())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    use super::*;

    #[test]
    fn a_listener_and_its_connection_are_this_processs_sockets() -> anyhow::Result<()> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let _client = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        let _server_side = listener.accept()?;

        let ours = socket_inodes(std::process::id())?;
        let sockets = tcp_sockets()?;
        let mine = |s: &&TcpSocket| ours.contains(&s.inode);
        let listening = sockets
            .iter()
            .filter(mine)
            .filter(|s| s.state == TcpState::Listen && s.local_port == port)
            .count();
        let to_port = sockets
            .iter()
            .filter(mine)
            .filter(|s| s.state == TcpState::Established && s.remote_port == port)
            .count();
        let from_port = sockets
            .iter()
            .filter(mine)
            .filter(|s| s.state == TcpState::Established && s.local_port == port)
            .count();
        anyhow::ensure!(
            (listening, to_port, from_port) == (1, 1, 1),
            "listening {listening}, connected to the port {to_port}, accepted {from_port}"
        );
        Ok(())
    }

    #[test]
    fn a_row_is_parsed_by_its_columns() {
        let row = "   3: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 \
                   00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(
            parse_row(row),
            Some(TcpSocket {
                local_port: 8080,
                remote_port: 54321,
                state: TcpState::Established,
                inode: "123456".to_owned(),
            })
        );
        assert_eq!(parse_row("  sl  local_address rem_address   st"), None);
    }
}
