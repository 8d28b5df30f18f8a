//! The `capture-kiosk` binary: parses the command line, sets up logging and hands over to the
//! library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before any thread exists: large pixel buffers go back to the kernel when freed.
    capture_kiosk::allocator::keep_large_buffers_apart();
    let cli = capture_kiosk::cli::Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    capture_kiosk::logging::init(level);
    // ureq and rumqttc share rustls; exactly one crypto provider must be installed (PLATFORM.md).
    let _ = rustls::crypto::ring::default_provider().install_default();
    capture_kiosk::cli::run(cli)
}
