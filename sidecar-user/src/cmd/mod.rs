//! What only the `sidecar` binary's subcommands use (never the running proxy):
//! `inject`, the admin client behind `connections`, its table, `discovery`.

pub mod admin_client;
pub mod connections;
pub mod discovery;
pub mod inject;
