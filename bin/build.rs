//! Sets `cfg(canopy_root)` when the build runs as root, so that the end-to-end tests that need
//! root (network namespaces) are marked ignored, with the reason, in a build that is not
//! (instead of passing without running). CI builds and runs the suite as root.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(canopy_root)");
    println!("cargo::rerun-if-changed=build.rs");
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[cfg(unix)]
    if unsafe { libc::geteuid() } == 0 {
        println!("cargo::rustc-cfg=canopy_root");
    }
}
