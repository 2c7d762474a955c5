//! Query parameters and path segments of the admin API, parsed into typed values (or a 400).

use super::super::http::{digits, Response};
use super::super::query::{decode_cursor, OnlineFilter, OnlineQuery};
use crate::presence::{Aggregate, DeviceType, UserId};

/// The value of parameter `name`, if given.
pub fn get<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Query parameters, each allowed at most once and only from `allowed`.
pub fn params(query: &str, allowed: &[&str]) -> Result<Vec<(String, String)>, Response> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if !allowed.contains(&&*k) {
            let msg = format!("unknown parameter `{k}` (allowed: {})", allowed.join(", "));
            return Err(Response::error(400, &msg));
        }
        if out.iter().any(|(x, _)| *x == k) {
            return Err(Response::error(
                400,
                &format!("parameter `{k}` given twice"),
            ));
        }
        if v.is_empty() {
            return Err(Response::error(400, &format!("parameter `{k}` is empty")));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

pub fn page_args(
    p: &[(String, String)],
    default_limit: usize,
    max: usize,
) -> Result<(usize, Option<UserId>), Response> {
    let mut limit = default_limit.min(max);
    let mut after = None;
    for (k, v) in p {
        match k.as_str() {
            "limit" => {
                // Digits only, as every number in a query parameter (`+5` is refused).
                limit = digits::<usize>(v)
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| {
                        Response::error(400, &format!("limit must be between 1 and {max}"))
                    })?;
            }
            "cursor" => {
                after = Some(
                    decode_cursor(v).ok_or_else(|| Response::error(400, "cursor is malformed"))?,
                );
            }
            _ => {}
        }
    }
    Ok((limit, after))
}

/// `/api/online`'s parameters.
pub fn parse_online(query: &str, max_page: usize) -> Result<OnlineQuery, Response> {
    let p = params(
        query,
        &[
            "group",
            "role",
            "region",
            "device_type",
            "status",
            "q",
            "limit",
            "cursor",
        ],
    )?;
    let mut filter = OnlineFilter::default();
    for (k, v) in &p {
        match k.as_str() {
            "group" => filter.group = Some(v.clone()),
            "role" => filter.role = Some(v.clone()),
            "region" => filter.region = Some(v.clone()),
            "q" => filter.q = Some(v.clone()),
            "device_type" => {
                filter.device_type = Some(DeviceType::parse(v).ok_or_else(|| {
                    Response::error(
                        400,
                        "device_type must be web, ios, android, desktop or other",
                    )
                })?);
            }
            "status" => {
                filter.status = Some(match v.as_str() {
                    "online" => Aggregate::Online,
                    "away" => Aggregate::Away,
                    "busy" => Aggregate::Busy,
                    _ => return Err(Response::error(400, "status must be online, away or busy")),
                });
            }
            _ => {}
        }
    }
    let (limit, after) = page_args(&p, 100, max_page)?;
    Ok(OnlineQuery {
        filter,
        after,
        limit,
    })
}

/// `from`/`to` in ms since the epoch; `to` defaults to now, `from` to a day before `to`.
pub fn time_range(p: &[(String, String)]) -> Result<(u64, u64), Response> {
    let get = |name: &str| -> Result<Option<u64>, Response> {
        match get(p, name) {
            None => Ok(None),
            Some(v) => digits(v)
                .map(Some)
                .ok_or_else(|| Response::error(400, &format!("{name} must be ms since the epoch"))),
        }
    };
    let to = get("to")?.unwrap_or_else(crate::shard::now_ms);
    let from = get("from")?.unwrap_or(to.saturating_sub(86_400_000));
    if from > to {
        return Err(Response::error(400, "from must not be after to"));
    }
    Ok((from, to))
}

/// A path segment, percent-decoded; empty or undecodable is `None`.
pub fn segment(s: &str) -> Option<String> {
    let d = percent_encoding::percent_decode_str(s).decode_utf8().ok()?;
    (!d.is_empty()).then(|| d.into_owned())
}
