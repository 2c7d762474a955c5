// Pure: the local presence cache, its `seq` de-duplication and its reconciliation after a
// reconnect. No I/O; `test/cache.test.js` checks it.
//
// docs/PROTOCOL.md §3: on one connection, for each user and feed, `seq` never goes back, and a
// new subscription's snapshot comes before any live update. After a reconnect (possibly to
// another node, whose clock may be briefly behind) the new snapshot is the state to trust. So:
// - within a connection ("epoch"), an event whose `seq` is not above the cached one is dropped;
// - the first event of a feed in a new epoch (its snapshot) replaces the cached state, and is
//   news only if the state differs from the cached one.

/** @typedef {{type: "presence", user: string, status: string, text?: string, devices: number,
 *  last_seen?: number, ts: number, seq: number, group?: string}} Presence */

/** Whether two states differ in what an app shows. */
function differs(a, b) {
  return a.status !== b.status || (a.text ?? null) !== (b.text ?? null) ||
    a.devices !== b.devices || (a.last_seen ?? null) !== (b.last_seen ?? null);
}

export class PresenceCache {
  constructor() {
    /** @type {Map<string, {state: Presence, epoch: number}>} direct subscriptions */
    this.users = new Map();
    /** @type {Map<string, Map<string, {state: Presence, epoch: number}>>} group feeds */
    this.groups = new Map();
    this.epoch = 0;
  }

  /** A new connection: the next snapshot of each feed replaces what is cached. */
  newEpoch() {
    this.epoch += 1;
  }

  /**
   * A `presence` event from the server. Returns true when the app should hear of it: a newer
   * state on this connection, or a snapshot after a reconnect that differs from the cache.
   * @param {Presence} ev
   * @returns {boolean}
   */
  apply(ev) {
    if (!ev || typeof ev.user !== "string" || typeof ev.seq !== "number") return false;
    let feed = this.users;
    if (typeof ev.group === "string") {
      feed = this.groups.get(ev.group);
      if (!feed) {
        feed = new Map();
        this.groups.set(ev.group, feed);
      }
    }
    const cur = feed.get(ev.user);
    if (cur && cur.epoch === this.epoch && !(ev.seq > cur.state.seq)) return false;
    feed.set(ev.user, { state: ev, epoch: this.epoch });
    return !cur || cur.epoch === this.epoch || differs(cur.state, ev);
  }

  /**
   * A `group_snapshot`: replaces the group's members. Returns the members that changed or
   * appeared, and the users that were cached as members and are no longer in it.
   * @param {string} group
   * @param {Presence[]} members
   * @returns {{changed: Presence[], gone: string[]}}
   */
  applyGroupSnapshot(group, members) {
    const old = this.groups.get(group) ?? new Map();
    const next = new Map();
    const changed = [];
    for (const m of Array.isArray(members) ? members : []) {
      if (!m || typeof m.user !== "string") continue;
      const prev = old.get(m.user);
      next.set(m.user, { state: m, epoch: this.epoch });
      if (!prev || differs(prev.state, m)) changed.push(m);
    }
    const gone = [...old.keys()].filter((u) => !next.has(u));
    this.groups.set(group, next);
    return { changed, gone };
  }

  /** Forgets a directly watched user. */
  forgetUser(user) {
    this.users.delete(user);
  }

  /** Forgets a group feed. */
  forgetGroup(group) {
    this.groups.delete(group);
  }

  /**
   * The latest known state of `user`: its direct subscription's, else the newest seen on a
   * group feed; `undefined` when unknown.
   * @param {string} user
   * @returns {Presence | undefined}
   */
  get(user) {
    const direct = this.users.get(user);
    if (direct) return direct.state;
    let best;
    for (const feed of this.groups.values()) {
      const e = feed.get(user);
      if (e && (!best || e.epoch > best.epoch || (e.epoch === best.epoch && e.state.seq > best.state.seq))) {
        best = e;
      }
    }
    return best?.state;
  }

  /**
   * The visible members of `group` as cached (a member that went offline on the feed is kept
   * with status `offline` until the next snapshot).
   * @param {string} group
   * @returns {Presence[]}
   */
  members(group) {
    return [...(this.groups.get(group)?.values() ?? [])].map((e) => e.state);
  }
}
