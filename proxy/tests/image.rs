//! The image (Containerfile), built with this build's sluice and run as
//! deploy/ runs it: podman, a non-root uid, every capability dropped but
//! NET_ADMIN and NET_RAW, a read-only root, in a pod namespace with a
//! workload. `sluice rules install` then `sluice run` (the tproxy manifest's
//! init container and sidecar) must intercept a client's connection, and
//! `sluice istio-iptables` with the injector's arguments (the Istio
//! template's init container) must pass Istio's own validation, run as the
//! mesh proxy's uid.
//!
//! The image's base comes from `make image-base` (`make test` makes it).
//! Where podman or the base is missing, each test says so and skips: these
//! machines reach no container registry, so there is nothing else to run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;

use common::*;
use netlab::{ClientPod, Netns};
use sluice::istio::INJECTOR;

/// What `make image` and its base use (Makefile: PODMAN, IMAGE_BASE).
const PODMAN: &[&str] = &["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"];
const BASE: &str = "localhost/sluice-base:bookworm";
const PORT: u16 = 9080;
const MESH_UID: u32 = 1337;

fn podman() -> Command {
    let mut command = Command::new(PODMAN[0]);
    command.args(&PODMAN[1..]);
    command
}

fn output(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An image built for one test, removed on drop with every image its build
/// made (its stages', which carry its label).
struct Image {
    name: String,
}

impl Image {
    fn label(&self) -> String {
        format!("sl-test={}", self.name)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let filter = format!("label={}", self.label());
        let listed = podman()
            .args(["images", "--all", "--quiet", "--filter", &filter])
            .output();
        let ids: Vec<String> = listed.map_or_else(
            |_| Vec::new(),
            |out| {
                let text = String::from_utf8_lossy(&out.stdout);
                text.split_whitespace().map(String::from).collect()
            },
        );
        let _ = podman().args(["rmi", "-f", &self.name]).args(&ids).output();
    }
}

/// Builds the Containerfile's runtime stage around this build's sluice, as
/// `make image` does around the release build's; `None` (said why) where
/// no podman or no base is there to build with.
fn image(purpose: &str) -> Option<Image> {
    if Command::new(PODMAN[0]).arg("--version").output().is_err() {
        eprintln!("SKIP: podman is not installed (make image-deps installs it)");
        return None;
    }
    if !podman()
        .args(["image", "exists", BASE])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!(
            "SKIP: no image base {BASE} (make image-base makes it; it said why it could not)"
        );
        return None;
    }
    // The context: just the binary where the `prebuilt` stage looks for it.
    let context = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("image-{purpose}-{}", std::process::id()));
    let bin = context.join("target/release");
    std::fs::create_dir_all(&bin).expect("make the build context");
    std::fs::copy(env!("CARGO_BIN_EXE_sluice"), bin.join("sluice")).expect("copy sluice");
    let containerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Containerfile");
    let name = format!("localhost/sl-test-{purpose}:{}", std::process::id());
    let image = Image { name };
    let out = output(
        podman()
            .args([
                "build",
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(["--build-arg", &format!("BASE={BASE}")])
            .args(["--label", &image.label()])
            .args([
                "--build-arg",
                "SLUICE_FROM=prebuilt",
                "-t",
                &image.name,
                "-f",
            ])
            .arg(&containerfile)
            .arg(&context),
    );
    let _ = std::fs::remove_dir_all(&context);
    assert!(out.status.success(), "podman build: {}", stderr(&out));
    Some(image)
}

/// `podman run` of `image` in `ns` as the manifests run sluice: uid 65534,
/// NET_ADMIN and NET_RAW only, read-only root; then the image's entrypoint
/// (sluice) with the arguments that follow.
fn as_manifests(ns: &Netns, image: &Image, name: &str, options: &[&str]) -> Vec<String> {
    let mut with_sysctls: Vec<&str> = Vec::new();
    for sysctl in POD_SYSCTLS {
        with_sysctls.extend(["--sysctl", sysctl]);
    }
    with_sysctls.extend(options);
    container(
        ns,
        image,
        name,
        "65534:65534",
        &["NET_ADMIN", "NET_RAW"],
        &with_sysctls,
    )
}

/// The pod's `securityContext.sysctls` in deploy/: a container cannot set
/// them itself (its /proc/sys is read-only).
const POD_SYSCTLS: [&str; 3] = [
    "net.ipv4.tcp_fwmark_accept=1",
    "net.ipv4.fwmark_reflect=1",
    "net.ipv6.fwmark_reflect=1",
];

/// `podman run` of `image` in `ns` as `user` with `caps` and `options`.
fn container(
    ns: &Netns,
    image: &Image,
    name: &str,
    user: &str,
    caps: &[&str],
    options: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = PODMAN.iter().map(ToString::to_string).collect();
    args.extend(
        [
            "run",
            "--rm",
            "--name",
            name,
            "--user",
            user,
            "--cap-drop=all",
            "--read-only",
            // podman's default rlimits exceed what these VMs allow.
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
        ]
        .map(String::from),
    );
    args.push(format!("ns:{}", ns.path().display()));
    if !caps.is_empty() {
        args.push(format!("--cap-add={}", caps.join(",")));
    }
    args.extend(options.iter().map(ToString::to_string));
    args.push(image.name.clone());
    args
}

/// A container that outlived its test (a panic before it stopped) is
/// removed.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", &self.0]).output();
    }
}

fn run_to_end(args: &[String], more: &[&str]) -> Output {
    let (program, rest) = args.split_first().expect("a command");
    output(Command::new(program).args(rest).args(more))
}

/// podman's default seccomp profile, which refuses io_uring as Docker's
/// and containerd's RuntimeDefault do, with the three io_uring syscalls
/// allowed: what the manifests' sidecar needs beyond the runtime's default
/// (`sluice run` refuses to start without them, and says so).
fn io_uring_seccomp_profile() -> PathBuf {
    let default = "/usr/share/containers/seccomp.json";
    let text = std::fs::read_to_string(default).unwrap_or_else(|e| panic!("{default}: {e}"));
    let mut profile: serde_json::Value = serde_json::from_str(&text).expect("a seccomp profile");
    let allow = serde_json::json!({
        "names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
        "action": "SCMP_ACT_ALLOW",
    });
    profile["syscalls"]
        .as_array_mut()
        .expect("the profile's syscalls")
        .push(allow);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("seccomp-io-uring-{}.json", std::process::id()));
    std::fs::write(&path, profile.to_string()).expect("write the seccomp profile");
    path
}

#[test]
fn the_image_installs_the_rules_and_intercepts_as_the_manifests_run_it() {
    let Some(image) = image("tproxy") else { return };
    let topology = ClientPod::new("img-tp").expect("client ⇄ pod");
    let workload = Workload::start(&topology.pod, PORT, Behaviour::Echo, 1);
    let name = format!("sl-img-{}", std::process::id());
    let _guard = Container(name.clone());

    // Without the pod's sysctls, the init container says what to set.
    let caps = ["NET_ADMIN", "NET_RAW"];
    let bare = container(&topology.pod, &image, &name, "65534:65534", &caps, &[]);
    let out = run_to_end(&bare, &["rules", "install"]);
    assert!(!out.status.success(), "rules install without the sysctls");
    let err = stderr(&out);
    assert!(
        err.contains("net.ipv4.tcp_fwmark_accept") && err.contains("securityContext.sysctls"),
        "{err}"
    );

    // The init container as deploy/ has it: the defaults (tproxy, every
    // port), the pod's sysctls.
    let out = run_to_end(
        &as_manifests(&topology.pod, &image, &name, &[]),
        &["rules", "install"],
    );
    assert!(out.status.success(), "rules install: {}", stderr(&out));

    // The sidecar: `sluice run` with the defaults, the image's binary.
    // The test's launcher appends the program's path: env runs it. The
    // launcher starts its command inside the pod's namespace, where runc
    // takes the container's namespace (the same) for its host's and
    // refuses podman's sysctls: podman goes back to where the other
    // containers were started from.
    // Under the runtime's default seccomp profile, io_uring is refused:
    // sluice says so and exits.
    let out = run_to_end(&as_manifests(&topology.pod, &image, &name, &[]), &["run"]);
    assert!(
        !out.status.success(),
        "sluice run under the default profile"
    );
    assert!(stderr(&out).contains("seccomp profile"), "{}", stderr(&out));

    let profile = io_uring_seccomp_profile();
    let seccomp = format!("seccomp={}", profile.display());
    let options = ["--security-opt", &seccomp, "--entrypoint", "/usr/bin/env"];
    let args = as_manifests(&topology.pod, &image, &name, &options);
    let back = format!("--net=/proc/{}/ns/net", std::process::id());
    let wrapper: Vec<&str> = ["nsenter", back.as_str()]
        .into_iter()
        .chain(args.iter().map(String::as_str))
        .collect();
    let launch = Launch {
        wrapper: &wrapper,
        program: Some(Path::new("/usr/local/bin/sluice")),
        ..Launch::default()
    };
    let sluice = Sluice::launch(&topology.pod, &launch, &[]);
    let _ = std::fs::remove_file(&profile);

    let stream = connect(&topology.client, pod_v4(PORT)).expect("connect through sluice");
    let payload = random_bytes(64 << 10, 3);
    let received = exchange(stream, payload.clone());
    assert_eq!(&received[..payload.len()], payload.as_slice());
    assert_eq!(
        workload.via_sluice.load(Ordering::SeqCst),
        1,
        "the workload did not see sluice's bypass source: not intercepted"
    );
    assert_eq!(workload.direct.load(Ordering::SeqCst), 0);
    let log = sluice.stop();
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn the_image_runs_istio_iptables_with_the_injectors_arguments() {
    let Some(image) = image("istio") else { return };
    let topology = ClientPod::new("img-ist").expect("client ⇄ pod");
    let pod = &topology.pod;
    let name = format!("sl-img-ist-{}", std::process::id());
    let _guard = Container(name.clone());
    // Istio's validation as its istio-validation container runs it: as the
    // mesh proxy's uid, no capability at all.
    let validate = || {
        let uid = format!("{MESH_UID}:{MESH_UID}");
        let args = container(pod, &image, &name, &uid, &[], &[]);
        let out = run_to_end(
            &args,
            &[
                "istio-iptables",
                "--run-validation",
                "--skip-rule-apply",
                "--probe-timeout=2s",
            ],
        );
        (out.status.code(), stderr(&out))
    };
    let (code, err) = validate();
    assert_eq!(code, Some(126), "no capture yet: {err}");

    // The Istio template's init container: `sluice` + Istio's arguments.
    let mut more = vec!["istio-iptables"];
    more.extend(INJECTOR);
    let out = run_to_end(&as_manifests(pod, &image, &name, &[]), &more);
    assert!(out.status.success(), "istio-iptables: {}", stderr(&out));

    let (code, err) = validate();
    assert_eq!(code, Some(0), "with the capture: {err}");
}
