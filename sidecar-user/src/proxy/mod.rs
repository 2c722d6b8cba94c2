//! The transparent proxy: accept a captured connection, recover where the app meant
//! to go, connect there, copy bytes both ways.

pub mod addr;
pub mod connections;
pub mod copy;
pub mod listener;
pub mod outbound;

pub use addr::{ClientAddr, OrigDstAddr};
