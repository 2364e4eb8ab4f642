//! Compiles the eBPF programs in `bpf/*.bpf.c` with clang and generates a
//! Rust skeleton for each (`$OUT_DIR/<name>.skel.rs`, included by the module
//! that loads it). A missing tool fails the build with the package to
//! install: a stub object would only move the failure to run time.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{self, Command};

const BPF_DIR: &str = "bpf";
const INSTALL: &str =
    "`apt-get install clang linux-libc-dev libelf-dev zlib1g-dev pkg-config make` (or `make deps`)";

fn main() {
    if let Err(message) = build() {
        eprintln!("error: {message}");
        process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    println!("cargo:rerun-if-changed={BPF_DIR}");
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = env::var_os("CLANG").map_or_else(|| PathBuf::from("clang"), PathBuf::from);
    check_clang(&clang)?;

    let mut sources = Vec::new();
    for entry in fs::read_dir(BPF_DIR).map_err(|e| format!("reading {BPF_DIR}/: {e}"))? {
        let path = entry
            .map_err(|e| format!("reading {BPF_DIR}/: {e}"))?
            .path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(stem) = name.strip_suffix(".bpf.c") {
            sources.push((stem.to_owned(), path.clone()));
        }
        if name.ends_with(".c") || name.ends_with(".h") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    sources.sort();

    for (stem, source) in sources {
        libbpf_cargo::SkeletonBuilder::new()
            .source(&source)
            .clang(&clang)
            .clang_args(clang_args())
            // The skeleton include_bytes!()es the object in OUT_DIR rather
            // than spelling it out as a byte literal rustc has to parse.
            .reference_obj(true)
            .build_and_generate(out_dir.join(format!("{stem}.skel.rs")))
            .map_err(|e| {
                format!(
                    "compiling {}: {e:#}\n(the eBPF programs need clang and the kernel's UAPI headers, \
                     linux/bpf.h; {INSTALL} installs them; libbpf's own headers come \
                     with the libbpf-sys crate)",
                    source.display()
                )
            })?;
    }
    Ok(())
}

fn check_clang(clang: &Path) -> Result<(), String> {
    match Command::new(clang).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`{} --version` failed ({}): the eBPF programs in proxy/bpf/ are compiled with clang; \
             install it with {INSTALL}",
            clang.display(),
            out.status
        )),
        Err(e) => Err(format!(
            "cannot run `{}` ({e}): the eBPF programs in proxy/bpf/ are compiled with clang; \
             install it with {INSTALL}, or point CLANG at a clang binary",
            clang.display()
        )),
    }
}

/// Debian keeps `asm/types.h` (which `linux/bpf.h` includes) under the
/// multiarch directory, which clang does not search for `-target bpf`.
fn clang_args() -> Vec<String> {
    let mut args = vec!["-Wall".to_owned(), "-Werror".to_owned()];
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    if Path::new(&multiarch).is_dir() {
        args.push(format!("-I{multiarch}"));
    }
    args
}
