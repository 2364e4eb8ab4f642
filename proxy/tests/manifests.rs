//! The Kubernetes manifests under deploy/, checked without a cluster: every
//! document parses, the sluice containers' arguments are accepted by
//! sluice's own command line (`--dry-run`), the init container and the
//! sidecar agree on the policy, the probes and the scrape annotation point
//! at sluice's defaults, the grace period fits the drain, and each sluice
//! container runs as a non-root user, granted exactly the capabilities its
//! mode needs, which the image's binary carries as file capabilities.

mod common;

use std::collections::BTreeSet;

use common::*;
use netlab::Netns;
use yaml_rust2::Yaml;

/// Runs sluice with `args` in a namespace of its own (a broken --dry-run
/// could touch nothing else); its stdout on success.
fn sluice_ok(ns: &Netns, args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = sluice_cli(ns, &args);
    assert!(
        output.status.success(),
        "sluice {args:?} refused the manifest's arguments: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `sluice run --dry-run` of `args` (which start with `run`).
fn run_config(ns: &Netns, args: &[String]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--dry-run".into());
    serde_json::from_str(&sluice_ok(ns, &args)).expect("run --dry-run prints JSON")
}

fn capabilities(container: &Yaml) -> (BTreeSet<String>, BTreeSet<String>) {
    let caps = &container["securityContext"]["capabilities"];
    (
        yaml_strings(&caps["add"]).into_iter().collect(),
        yaml_strings(&caps["drop"]).into_iter().collect(),
    )
}

/// Not root, said so (`runAsNonRoot`: the kubelet refuses to start the
/// container as root), and no way to gain privileges (`no_new_privs`).
fn assert_non_root(container: &Yaml, name: &str) {
    let context = &container["securityContext"];
    assert_eq!(context["runAsNonRoot"].as_bool(), Some(true), "{name}");
    let user = context["runAsUser"].as_i64().expect("runAsUser");
    assert!(user > 0, "{name}: runAsUser {user}");
    assert_eq!(
        context["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{name}"
    );
}

fn port_of(addr: &serde_json::Value) -> i64 {
    addr.as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {addr}"))
}

/// The image `make image` builds (Makefile: IMAGE).
static IMAGE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("sluice:{}", env!("CARGO_PKG_VERSION")));

/// What sluice's client-source return path turns on (routing.rs SYSCTLS).
const RETURN_PATH_SYSCTLS: [&str; 3] = [
    "net.ipv4.tcp_fwmark_accept",
    "net.ipv4.fwmark_reflect",
    "net.ipv6.fwmark_reflect",
];

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(ToString::to_string).collect()
}

#[test]
fn manifests_agree_with_sluice() {
    let ns = Netns::new("manifest").expect("netns");
    let mut sidecars = 0;
    for (path, docs) in manifests() {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        assert!(
            text.contains(&format!("setcap {IMAGE_FILE_CAPS}")),
            "{name}: the image's file capabilities are not the ones the tests run sluice with"
        );
        for doc in docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some("Deployment"))
        {
            let pod = &doc["spec"]["template"];
            let spec = &pod["spec"];
            let containers = spec["containers"].as_vec().expect("containers");
            let init = spec["initContainers"].as_vec().cloned().unwrap_or_default();
            assert!(
                !containers.iter().any(is_sluice),
                "{name}: sluice must be a native sidecar (an init container with restartPolicy Always), not a container"
            );
            for workload in containers {
                let (add, _) = capabilities(workload);
                assert!(add.is_empty(), "{name}: the workload is granted {add:?}");
                assert_eq!(
                    workload["securityContext"]["runAsNonRoot"].as_bool(),
                    Some(true),
                    "{name}: the workload runs as non-root"
                );
            }

            let sidecar: Vec<&Yaml> = init
                .iter()
                .filter(|c| is_sluice(c) && c["restartPolicy"].as_str() == Some("Always"))
                .collect();
            assert_eq!(sidecar.len(), 1, "{name}: one sluice sidecar");
            let sidecar = sidecar[0];
            sidecars += 1;
            let args = yaml_strings(&sidecar["args"]);
            assert_eq!(args.first().map(String::as_str), Some("run"), "{name}");
            assert_eq!(yaml_strings(&sidecar["command"]), ["sluice"], "{name}");
            let config = run_config(&ns, &args);
            let mode = config["policy"]["mode"].as_str().expect("mode").to_string();
            assert_eq!(
                sidecar["image"].as_str(),
                Some(IMAGE.as_str()),
                "{name}: the image `make image` builds"
            );

            // A container's /proc/sys is read-only: the pod sets the sysctls
            // of the client-source return path (the image test shows sluice
            // refuses to start without them).
            if config["upstream_source"].as_str() == Some("client") {
                let sysctls: BTreeSet<(String, String)> = spec["securityContext"]["sysctls"]
                    .as_vec()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        let field = |k: &str| s[k].as_str().unwrap_or_default().to_string();
                        (field("name"), field("value"))
                    })
                    .collect();
                for sysctl in RETURN_PATH_SYSCTLS {
                    assert!(
                        sysctls.contains(&(sysctl.to_string(), "1".to_string())),
                        "{name}: the pod must set {sysctl}=1 (securityContext.sysctls)"
                    );
                }
            }

            // Probes and the scrape annotation point at sluice's endpoints.
            let readiness = port_of(&config["readiness_addr"]);
            for probe in ["readinessProbe", "startupProbe"] {
                let http = &sidecar[probe]["httpGet"];
                assert_eq!(
                    http["path"].as_str(),
                    Some("/healthz/ready"),
                    "{name} {probe}"
                );
                assert_eq!(http["port"].as_i64(), Some(readiness), "{name} {probe}");
            }
            assert_eq!(readiness, 15021, "{name}: the readiness default");
            let annotations = &pod["metadata"]["annotations"];
            assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
            assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
            let metrics = port_of(&config["metrics_addr"]);
            assert_eq!(
                annotations["prometheus.io/port"].as_str(),
                Some(metrics.to_string().as_str()),
                "{name}"
            );
            assert_eq!(metrics, 15020, "{name}: the metrics default");

            // The grace period covers the workload's preStop and sluice's drain.
            let drain = config["drain_timeout"].as_f64().expect("drain_timeout");
            let pre_stop = containers
                .iter()
                .filter_map(|c| c["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64())
                .max()
                .unwrap_or(0);
            let grace = spec["terminationGracePeriodSeconds"]
                .as_i64()
                .expect("terminationGracePeriodSeconds");
            assert!(
                grace as f64 >= pre_stop as f64 + drain + 10.0,
                "{name}: {grace}s of grace for a {pre_stop}s preStop and a {drain}s drain"
            );

            // Exactly the capabilities the mode needs; everything else dropped.
            let needed = match mode.as_str() {
                "ebpf" => set(&["NET_ADMIN", "BPF"]),
                _ => set(&["NET_ADMIN", "NET_RAW"]),
            };
            let (add, drop) = capabilities(sidecar);
            assert_eq!(add, needed, "{name}: sidecar capabilities in {mode} mode");
            assert_eq!(drop, set(&["ALL"]), "{name}");
            assert_non_root(sidecar, &name);
            // io_uring: RuntimeDefault refuses it (tests/image.rs).
            let seccomp = sidecar["securityContext"]["seccompProfile"]["type"].as_str();
            assert!(
                matches!(seccomp, Some("Unconfined" | "Localhost")),
                "{name}: the sidecar's seccomp profile must allow io_uring: {seccomp:?}"
            );

            // The init container installs what the sidecar expects.
            let installers: Vec<&Yaml> = init
                .iter()
                .filter(|c| is_sluice(c) && c["restartPolicy"].as_str() != Some("Always"))
                .collect();
            match mode.as_str() {
                // `sluice run` attaches the program itself.
                "ebpf" => assert!(installers.is_empty(), "{name}"),
                _ => {
                    assert_eq!(installers.len(), 1, "{name}: one init container");
                    let installer = installers[0];
                    let args = yaml_strings(&installer["args"]);
                    assert_eq!(args[..2], ["rules", "install"], "{name}");
                    let mut dry = args.clone();
                    dry.push("--dry-run".into());
                    sluice_ok(&ns, &dry);
                    // The policy flags are shared: `run` with the installer's
                    // flags must see the sidecar's policy.
                    let as_run: Vec<String> = std::iter::once("run".to_string())
                        .chain(args[2..].iter().cloned())
                        .collect();
                    assert_eq!(
                        run_config(&ns, &as_run)["policy"],
                        config["policy"],
                        "{name}: the init container and the sidecar disagree on the policy"
                    );
                    assert!(!args.contains(&"--install-rules".to_string()), "{name}");
                    let (add, drop) = capabilities(installer);
                    assert_eq!(add, set(&["NET_ADMIN", "NET_RAW"]), "{name}: init");
                    assert_eq!(drop, set(&["ALL"]), "{name}: init");
                    assert_non_root(installer, &name);
                }
            }
        }
    }
    assert!(sidecars >= 2, "the tproxy and the ebpf variants");
    let saved = ns
        .output(&mut std::process::Command::new("iptables-save"))
        .expect("iptables-save");
    assert!(
        !String::from_utf8_lossy(&saved.stdout).contains("SLUICE"),
        "a dry run installed rules"
    );
}

/// deploy/istio-injection.yaml: a custom injection template that runs
/// Istio's own istio-init arguments with sluice, as a non-root uid with
/// NET_ADMIN and NET_RAW only; sluice takes the injector's arguments
/// (`sluice istio-iptables ... -n`).
#[test]
fn the_istio_template_runs_istio_init_with_sluice_least_privileged() {
    let (path, docs) = manifests()
        .into_iter()
        .find(|(p, _)| p.ends_with("istio-injection.yaml"))
        .expect("deploy/istio-injection.yaml");
    let name = path.display().to_string();
    let templates = &docs[0]["spec"]["values"]["sidecarInjectorWebhook"]["templates"];
    let text = templates["sluice"]
        .as_str()
        .expect("a template named sluice");
    let template = &yaml_rust2::YamlLoader::load_from_str(text).expect("the template is YAML")[0];
    let init = template["spec"]["initContainers"]
        .as_vec()
        .expect("initContainers");
    assert_eq!(init.len(), 1, "{name}");
    let container = &init[0];
    // The strategic merge patch finds Istio's container by this name.
    assert_eq!(container["name"].as_str(), Some("istio-init"), "{name}");
    assert_eq!(container["image"].as_str(), Some(IMAGE.as_str()), "{name}");
    assert_eq!(yaml_strings(&container["command"]), ["sluice"], "{name}");
    let (add, drop) = capabilities(container);
    assert_eq!(add, set(&["NET_ADMIN", "NET_RAW"]), "{name}");
    assert_eq!(drop, set(&["ALL"]), "{name}");
    assert_non_root(container, &name);

    // Istio's rules depend on the pod's addresses: a pod it is.
    let pod = netlab::ClientPod::new("manifest-ist").expect("client ⇄ pod");
    let ns = &pod.pod;
    let args: Vec<String> = ["istio-iptables"]
        .iter()
        .chain(sluice::istio::INJECTOR)
        .chain(&["-n"])
        .map(ToString::to_string)
        .collect();
    let plan = sluice_ok(ns, &args);
    assert!(plan.contains("REDIRECT --to-ports 15006"), "{plan}");
}
