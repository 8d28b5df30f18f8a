//! capture-kiosk: the brain of an unattended drive-through vehicle inspection bay.
//!
//! `ARCHITECTURE.md` at the top of the repository maps the modules.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod allocator;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod demo;
pub mod display;
pub mod home_assistant;
pub mod imaging;
pub mod inspection;
pub mod logging;
pub mod mqtt;
pub mod setting;
pub mod standin;
pub mod status;
pub mod store;
pub mod trust;
pub mod upload;
pub mod vehicle;
