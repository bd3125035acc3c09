//! Twenty stock Envoy gateways on one meshd: a VirtualService change is
//! active in every one of them, as each Envoy's own admin config dump
//! shows, within 2 s of the file being written.

use std::time::{Duration, Instant};

use crate::common::{
    eventually, free_port, hello_virtual_service, ingress_gateway, loopback_service, write, Backend, Envoy,
    Meshd, Pod,
};

const GATEWAYS: usize = 20;

#[test]
fn a_virtual_service_change_is_active_in_twenty_envoys_within_two_seconds() {
    let work = tempfile::tempdir().expect("tmp");
    let backend = Backend::start("hello");
    // Every gateway binds the same port (Envoy listeners use SO_REUSEPORT).
    let port = free_port();
    let config = work.path().join("config");
    write(
        &config.join("mesh.yaml"),
        &format!(
            "{}{}",
            ingress_gateway(port),
            loopback_service("hello", "http", 80, backend.port)
        ),
    );
    write(&config.join("vs.yaml"), &hello_virtual_service("config-v1", None));
    let meshd = Meshd::start(&config, work.path());
    let names: Vec<String> = (0..GATEWAYS)
        .map(|i| format!("istio-ingressgateway-{i}"))
        .collect();
    let envoys: Vec<Envoy> = names
        .iter()
        .map(|n| Envoy::start(&meshd, work.path(), &Pod::ingress_gateway(n)))
        .collect();
    for envoy in &envoys {
        eventually(
            "every gateway has the first route",
            Duration::from_secs(30),
            || {
                if envoy.holds_route("config-v1") {
                    Ok(())
                } else {
                    Err(envoy.proc.log_tail())
                }
            },
        );
    }
    write(&config.join("vs.yaml"), &hello_virtual_service("config-v2", None));
    let written = Instant::now();
    let mut pending: Vec<&Envoy> = envoys.iter().collect();
    let mut last = Duration::ZERO;
    eventually(
        "every gateway has the changed route",
        Duration::from_secs(30),
        || {
            pending.retain(|e| !e.holds_route("config-v2"));
            last = written.elapsed();
            if pending.is_empty() {
                Ok(())
            } else {
                Err(format!("{} gateways still on config-v1", pending.len()))
            }
        },
    );
    println!("the change was active in all {GATEWAYS} Envoys {last:?} after the write");
    assert!(
        last <= Duration::from_secs(2),
        "the change took {last:?} to reach all {GATEWAYS} Envoys"
    );
}
