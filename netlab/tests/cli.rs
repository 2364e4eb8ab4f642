//! `netlab up|exec|down` as a person would use them.

use std::path::Path;
use std::process::Command;

fn netlab(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_netlab"))
        .args(args)
        .output()
        .expect("run netlab")
}

#[test]
fn up_exec_down_leaves_nothing() {
    let name = format!("cli{}", std::process::id());
    let (client, pod) = (
        format!("/run/netns/sl-{name}-client"),
        format!("/run/netns/sl-{name}-pod"),
    );
    let up = netlab(&["up", "--name", &name]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(Path::new(&client).exists() && Path::new(&pod).exists());

    // The pod side holds its address; the exit status comes back.
    let addr = netlab(&[
        "exec",
        "--name",
        &name,
        "pod",
        "--",
        "cat",
        "/proc/thread-self/net/if_inet6",
    ]);
    assert!(String::from_utf8_lossy(&addr.stdout).contains("20010002000000000000000000000002"));
    let status = netlab(&[
        "exec", "--name", &name, "client", "--", "sh", "-c", "exit 7",
    ]);
    assert_eq!(status.status.code(), Some(7));

    let down = netlab(&["down", "--name", &name]);
    assert!(down.status.success());
    assert!(!Path::new(&client).exists() && !Path::new(&pod).exists());
    let again = netlab(&["exec", "--name", &name, "pod", "--", "true"]);
    assert!(!again.status.success(), "exec after down must fail");
}
