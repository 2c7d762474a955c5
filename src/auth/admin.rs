//! Who may use the admin port (and open read-only impersonations on the client port): the
//! static admin token, compared as SHA-256 digests, or a verified JWT carrying the role `admin`.

use std::sync::Arc;

use super::{Claims, Verifier};

/// Who is asking: the admin JWT's `sub`, or `static-token`.
pub type Identity = Arc<str>;

/// An admin credential, checked.
#[derive(Debug)]
pub struct Admin {
    pub id: Identity,
    /// The verified JWT's claims; `None` for the static admin token, which has none.
    pub claims: Option<Claims>,
}

/// Why a credential is not an admin's: 401 (not a valid credential at all) or 403 (valid, but
/// without the admin role).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAdmin {
    pub status: u16,
    pub reason: &'static str,
}

/// The admin behind `token`. `static_token`: the configured `admin.token`, if any.
pub fn admin_identity(
    verifier: &Verifier,
    static_token: Option<&str>,
    token: &str,
) -> Result<Admin, NotAdmin> {
    if let Some(fixed) = static_token {
        // Digests first: equal lengths, so the comparison's time says nothing about the
        // secret, not even its length.
        use subtle::ConstantTimeEq;
        let sha = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
        let (want, got) = (sha(fixed.as_bytes()), sha(token.as_bytes()));
        if bool::from(want.as_ref().ct_eq(got.as_ref())) {
            return Ok(Admin {
                id: "static-token".into(),
                claims: None,
            });
        }
    }
    let claims = verifier.verify(token).map_err(|e| NotAdmin {
        status: 401,
        reason: e.reason(),
    })?;
    if !claims.roles.iter().any(|r| r == "admin") {
        return Err(NotAdmin {
            status: 403,
            reason: "the token has no admin role",
        });
    }
    Ok(Admin {
        id: claims.sub.as_str().into(),
        claims: Some(claims),
    })
}
