//! The CQL schema of the `scylla` backend (`schema/*.cql`), rendered for a configuration.
