//! Which driver errors are worth retrying. The writer retries retryable errors with backoff
//! (bounded by `max_retries`) and drops the batch at once on the others.
//!
//! Retryable: the cluster is slow, overloaded, restarting or out of reach (timeouts,
//! `Overloaded`, `Unavailable`, broken or missing connections). Fatal: the request itself is
//! wrong and will be wrong next time too (syntax, invalid, unauthorized, bad values).

use ::scylla::errors::{
    DbError, ExecutionError, NewSessionError, PrepareError, RequestAttemptError,
};

use super::super::store::StoreError;

/// Whether the server's answer `e` may go away by itself.
pub fn db_retryable(e: &DbError) -> bool {
    match e {
        DbError::Unavailable { .. }
        | DbError::Overloaded
        | DbError::IsBootstrapping
        | DbError::ReadTimeout { .. }
        | DbError::WriteTimeout { .. }
        | DbError::ReadFailure { .. }
        | DbError::WriteFailure { .. }
        | DbError::Unprepared { .. }
        | DbError::ServerError
        | DbError::RateLimitReached { .. }
        | DbError::TruncateError
        | DbError::Other(_) => true,
        DbError::SyntaxError
        | DbError::Invalid
        | DbError::AlreadyExists { .. }
        | DbError::FunctionFailure { .. }
        | DbError::AuthenticationError
        | DbError::Unauthorized
        | DbError::ConfigError
        | DbError::ProtocolError => false,
        // Future variants: try again, bounded by `max_retries`.
        _ => true,
    }
}

pub fn attempt_retryable(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::DbError(db, _) => db_retryable(db),
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => true,
        RequestAttemptError::SerializationError(_)
        | RequestAttemptError::CqlRequestSerialization(_)
        | RequestAttemptError::RepreparedIdChanged { .. } => false,
        // Unparseable answers: a protocol mismatch, not a passing fault.
        RequestAttemptError::BodyExtensionsParseError(_)
        | RequestAttemptError::CqlResultParseError(_)
        | RequestAttemptError::CqlErrorParseError(_)
        | RequestAttemptError::UnexpectedResponse(_) => false,
        _ => true,
    }
}

pub fn prepare_retryable(e: &PrepareError) -> bool {
    match e {
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_retryable(first_attempt),
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::PreparedStatementIdsMismatch => true,
        _ => true,
    }
}

pub fn execution_retryable(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::BadQuery(_) => false,
        ExecutionError::LastAttemptError(a) => attempt_retryable(a),
        ExecutionError::PrepareError(p) => prepare_retryable(p),
        // No node to send to (all down, or none in `local_dc` yet), timeouts, pools still
        // connecting, metadata or schema agreement trouble: the cluster may come back.
        _ => true,
    }
}

pub fn connect_retryable(e: &NewSessionError) -> bool {
    !matches!(
        e,
        NewSessionError::EmptyKnownNodesList | NewSessionError::IllegalConfig(_)
    )
}

/// A [`StoreError`] for a failed write or prepare, with what was being done.
pub fn write_error(doing: &str, e: &ExecutionError) -> StoreError {
    StoreError {
        retryable: execution_retryable(e),
        message: format!("scylla: {doing}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ::scylla::errors::{BadQuery, ConnectionPoolError};

    use super::*;

    fn db(e: DbError) -> ExecutionError {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(e, "from the test".into()))
    }

    #[test]
    fn passing_faults_are_retried() {
        for e in [
            db(DbError::Overloaded),
            db(DbError::IsBootstrapping),
            db(DbError::ServerError),
            ExecutionError::RequestTimeout(Duration::from_millis(5)),
            ExecutionError::EmptyPlan,
            ExecutionError::ConnectionPoolError(ConnectionPoolError::Initializing),
            ExecutionError::LastAttemptError(RequestAttemptError::UnableToAllocStreamId),
        ] {
            assert!(execution_retryable(&e), "{e}");
        }
    }

    #[test]
    fn wrong_requests_are_not() {
        for e in [
            db(DbError::SyntaxError),
            db(DbError::Invalid),
            db(DbError::Unauthorized),
            db(DbError::ProtocolError),
            ExecutionError::BadQuery(BadQuery::TooManyQueriesInBatchStatement(70_000)),
        ] {
            assert!(!execution_retryable(&e), "{e}");
        }
    }

    #[test]
    fn a_missing_contact_list_is_fatal_an_unreachable_one_is_not() {
        assert!(!connect_retryable(&NewSessionError::EmptyKnownNodesList));
        assert!(connect_retryable(
            &NewSessionError::FailedToResolveAnyHostname(vec!["nowhere:9042".into()])
        ));
    }
}
