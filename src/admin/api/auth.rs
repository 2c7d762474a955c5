//! Who may use the admin API: the static admin token or a JWT with role `admin`
//! ([`crate::auth::admin_identity`]), answered as 401/403 responses.

use crate::admin::http::Response;
use crate::auth::Identity;
use crate::shard::Shard;

/// Checks an admin credential. Errors are the 401/403 responses to send.
pub fn authenticate(shard: &Shard, bearer: Option<&str>) -> Result<Identity, Response> {
    let token = bearer.ok_or_else(|| Response::error(401, "missing bearer token"))?;
    identity(shard, token).map_err(|(status, msg)| Response::error(status, msg))
}

/// The admin behind `token`, or (401|403, why).
pub fn identity(shard: &Shard, token: &str) -> Result<Identity, (u16, &'static str)> {
    let static_token = shard.cfg().admin.token.as_deref();
    crate::auth::admin_identity(shard.verifier(), static_token, token)
        .map(|admin| admin.id)
        .map_err(|e| (e.status, e.reason))
}
