//! Operations (SPEC §11): what a service manager and an SRE talk to — systemd's notify
//! protocol and watchdog, stall detection and the zero-downtime upgrade.

pub mod handover;
pub mod notify;
pub mod stall;
pub mod upgrade;
pub mod watchdog;
