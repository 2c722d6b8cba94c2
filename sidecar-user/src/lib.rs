//! The sidecar: kernel programs capture a pod's TCP connects without iptables, and
//! this transparent proxy carries them to where the application meant to go.
//!
//! [`app::build`] parses nothing and serves nothing: it binds every listener, loads and
//! attaches the programs, and returns a [`app::Bound`] holding all of it; running it
//! serves until SIGTERM/SIGINT and then drains.

pub mod admin;
pub mod app;
pub mod app_health;
pub mod caps;
pub mod config;
pub mod drain;
pub mod ebpf;
pub mod kubernetes;
pub mod mesh;
pub mod metrics;
pub mod process;
pub mod proxy;
pub mod service;
pub mod telemetry;
pub mod tls;
pub mod woken;
