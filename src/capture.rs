//! `meshd iptables`: the traffic capture rules of a pod with a sidecar, the
//! same as Istio's istio-iptables writes by default: outbound TCP is
//! redirected to Envoy's 15001 and inbound TCP to 15006, except traffic of
//! the proxy's own uid/gid (1337), traffic from 127.0.0.6 on `lo` (the
//! sidecar reaching its app), and inbound to 15090/15021/15020.

use std::io::Write;
use std::process::{Command, Stdio};

/// What the rules capture, with Istio's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureOptions {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations never captured (CIDRs).
    pub exclude_outbound_cidrs: Vec<String>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_uid: 1337,
            proxy_gid: 1337,
            exclude_inbound_ports: vec![15090, 15021, 15020],
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// `iptables-restore` is not installed or could not run.
    #[error("running iptables-restore: {0} (install the iptables package)")]
    Spawn(std::io::Error),
    /// `iptables-restore` refused the rules.
    #[error("iptables-restore failed: {0}")]
    Rejected(String),
}

/// The `nat` table rules, in `iptables-restore` format.
pub fn rules(o: &CaptureOptions) -> String {
    let mut r = vec![
        "*nat".to_string(),
        ":ISTIO_INBOUND - [0:0]".into(),
        ":ISTIO_REDIRECT - [0:0]".into(),
        ":ISTIO_IN_REDIRECT - [0:0]".into(),
        ":ISTIO_OUTPUT - [0:0]".into(),
        format!(
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            o.outbound_port
        ),
        format!(
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            o.inbound_port
        ),
        "-A PREROUTING -p tcp -j ISTIO_INBOUND".into(),
    ];
    for port in &o.exclude_inbound_ports {
        r.push(format!("-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN"));
    }
    r.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
    r.push("-A OUTPUT -p tcp -j ISTIO_OUTPUT".into());
    for port in &o.exclude_outbound_ports {
        r.push(format!("-A ISTIO_OUTPUT -p tcp --dport {port} -j RETURN"));
    }
    r.push("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN".into());
    for (kind, id) in [("uid", o.proxy_uid), ("gid", o.proxy_gid)] {
        // The proxy talking to its own pod's address on lo: that is inbound.
        r.push(format!(
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --{kind}-owner {id} -j ISTIO_IN_REDIRECT"
        ));
        r.push(format!(
            "-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {id} -j RETURN"
        ));
        r.push(format!("-A ISTIO_OUTPUT -m owner --{kind}-owner {id} -j RETURN"));
    }
    r.push("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN".into());
    for cidr in &o.exclude_outbound_cidrs {
        r.push(format!("-A ISTIO_OUTPUT -d {cidr} -j RETURN"));
    }
    r.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into());
    r.push("COMMIT".into());
    r.join("\n") + "\n"
}

/// Installs the rules in the current network namespace, leaving other
/// rules in place (`iptables-restore --noflush`).
pub fn install(o: &CaptureOptions) -> Result<(), CaptureError> {
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(CaptureError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules(o).as_bytes())
            .map_err(CaptureError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(CaptureError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CaptureError::Rejected(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_istios() {
        let r = rules(&CaptureOptions::default());
        for line in [
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
            "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
            "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
            "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        ] {
            assert!(r.lines().any(|l| l == line), "missing {line:?} in\n{r}");
        }
        // The catch-all redirect comes last, after every exception.
        let last_rule = r.lines().rfind(|l| l.starts_with("-A ISTIO_OUTPUT"));
        assert_eq!(last_rule, Some("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
    }
}
