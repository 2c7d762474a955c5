//! Operations (SPEC §11): what a service manager and an SRE talk to — systemd's notify
//! protocol and the zero-downtime upgrade.

pub mod notify;
