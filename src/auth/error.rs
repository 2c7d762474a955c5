//! The two error types of the auth layer: [`AuthError`] is what a client did wrong (a value, sent
//! back as a 401 body), [`AuthSetupError`] is what an operator got wrong in the config (fatal at
//! startup, worded to point at the exact key and file).

/// Why a token was refused. `Copy` and allocation-free: it is produced on the handshake path,
/// possibly for a flood of bad tokens. [`reason`](Self::reason) is the stable 401 body.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum AuthError {
    /// No token in the request (or an empty one).
    #[error("missing token")]
    Missing,
    /// Not a compact JWS, bad base64/JSON, or claims of the wrong type.
    #[error("malformed token")]
    Malformed,
    /// `exp` (plus leeway) is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` (minus leeway) is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// The signature does not verify with the selected key.
    #[error("bad signature")]
    BadSignature,
    /// No configured key uses the header's `alg` (this covers `none` and unknown names).
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    /// The `kid` names a key whose algorithm differs from the header's `alg`.
    #[error("algorithm does not match key")]
    AlgorithmMismatch,
    /// The `kid` is unknown, or no `kid` was given and no key without one fits the `alg`.
    #[error("unknown key id")]
    UnknownKey,
    /// A required claim is absent: `"sub"` or `"exp"`.
    #[error("{}", missing_claim_reason(.0))]
    MissingClaim(&'static str),
    /// `iss` is absent or differs from the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` is absent or shares no value with the configured audience.
    #[error("wrong audience")]
    WrongAudience,
    /// A `refresh` token names another user than the session's.
    #[error("token subject differs")]
    SubjectMismatch,
}

impl AuthError {
    /// Short, stable text for the 401 body and logs; clients may match on it.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing token",
            AuthError::Malformed => "malformed token",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
            AuthError::BadSignature => "bad signature",
            AuthError::AlgorithmNotAllowed => "algorithm not allowed",
            AuthError::AlgorithmMismatch => "algorithm does not match key",
            AuthError::UnknownKey => "unknown key id",
            AuthError::MissingClaim(claim) => missing_claim_reason(claim),
            AuthError::WrongIssuer => "wrong issuer",
            AuthError::WrongAudience => "wrong audience",
            AuthError::SubjectMismatch => "token subject differs",
        }
    }
}

/// Static text per claim so that [`AuthError::reason`] never formats.
fn missing_claim_reason(claim: &str) -> &'static str {
    match claim {
        "sub" => "missing claim: sub",
        "exp" => "missing claim: exp",
        _ => "missing claim",
    }
}

/// A config mistake, fatal at startup. The message names the config key and file at fault, e.g.
/// `auth.keys[1].pem: cannot read /x.pem: No such file or directory (os error 2)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AuthSetupError(pub String);

impl AuthSetupError {
    /// `at` is the config key (`auth.keys[0].alg`), `what` the complaint.
    pub(crate) fn at(at: impl std::fmt::Display, what: impl std::fmt::Display) -> Self {
        AuthSetupError(format!("{at}: {what}"))
    }
}
