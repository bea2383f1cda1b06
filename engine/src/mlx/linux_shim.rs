//! A stand-in for macOS's `mach_approximate_time`, for `mlx_linux` test builds only.
//!
//! mlx-rs 0.33 seeds its random state from `mach_approximate_time` (through `mach-sys`)
//! unconditionally, so a non-macOS binary that links mlx-rs needs the symbol. The engine never
//! draws MLX random numbers; the value only has to be a clock.

/// Nanoseconds since the Unix epoch (macOS's version counts mach ticks; only the changing value
/// matters to the caller).
#[unsafe(no_mangle)]
pub extern "C" fn mach_approximate_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Keeps the symbol in the link: static archives only contribute the objects something
/// references, and mlx-rs (which needs the symbol) comes after this crate on the linker's
/// command line.
pub(super) fn keep_linked() {
    std::hint::black_box(mach_approximate_time as extern "C" fn() -> u64);
}
