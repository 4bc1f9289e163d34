//! The Lua side of the driver: one shared prelude (the grant rule's twin and the queue's storage format)
//! and one small body per driver operation.
//!
//! Every script is `PRELUDE .. BODY`, so the decision code a test checks against
//! [`dlock_core::grant`] is byte for byte the code the operations run.
//!
//! # Storage
//! A name's queue is ONE hash, `KEYS[1]` = `{<prefix>:<encoded name>}:q`:
//! - field `<owner id>` → `"<seq> <mode> <granted 0|1> <converting_to -1..5> <expires µs> <token>"`;
//! - field `.seq` → the highest `seq` assigned;
//! - field `.tok` → the last fencing token.
//!
//! A name used through a [`Quorum`](dlock_core::Quorum) also has a *fence register*, the string key
//! `{<prefix>:<encoded name>}:f` (same hash tag, so same slot): a decimal `u64` without expiry, which
//! only [`FENCE`] reads or writes. It is the one key that outlives an idle name.
//!
//! Owner ids are `[A-Za-z0-9-]+`, so they never collide with the `.`-fields. Both counters follow
//! `max(last + 1, server time in µs)`. When the queue empties, the hash is deleted at once if the server
//! clock has passed both counters (the normal case); if a burst of grants ran the counters ahead of the
//! clock, the hash keeps just the two fields until the clock passes them (under a millisecond). Its
//! `PEXPIREAT` always covers its longest-living entry and the counters, so a name whose holders all
//! crashed disappears by itself, and no key outlives what it must remember.
//!
//! # Time
//! Scripts read the server clock with `TIME` (allowed: Redis ≥ 5 replicates scripts by their effects).
//! Expiry is in microseconds of server time, so the store never drops an entry before `ttl` after it
//! received the request that created or renewed it — by the server's wall clock, which must not step
//! (the crate docs' *Clocks* section says what a step does).

use dlock_core::LockMode;

/// The compatibility matrix as a Lua table literal, generated from [`LockMode::compatible_with`] so the
/// Lua copy cannot drift from core's table.
fn compat_table() -> String {
    let rows: Vec<String> = LockMode::ALL
        .iter()
        .map(|a| {
            let cells: Vec<&str> = LockMode::ALL
                .iter()
                .map(|b| {
                    if a.compatible_with(*b) {
                        "true"
                    } else {
                        "false"
                    }
                })
                .collect();
            format!("{{{}}}", cells.join(","))
        })
        .collect();
    format!("{{{}}}", rows.join(","))
}

/// Shared by every script. `@PUBLISH@` and `@COMPAT@` are filled in by [`script_source`].
const PRELUDE: &str = r#"
local PUBLISH = '@PUBLISH@'
local COMPAT = @COMPAT@

local function compatible(a, b)
  return COMPAT[a + 1][b + 1]
end

-- Twin of dlock_core::grant::grantable (1-based indices).
local function grantable(q, i)
  local me = q[i]
  for j = 1, #q do
    if j ~= i then
      local o = q[j]
      if (j < i or o.granted) and not compatible(me.mode, o.mode) then
        return false
      end
      if o.conv ~= nil and not compatible(me.mode, o.conv) then
        return false
      end
    end
  end
  return true
end

-- Twin of dlock_core::grant::conversion_grantable.
local function conversion_grantable(q, i)
  local t = q[i].conv
  if t == nil then
    return false
  end
  for j = 1, #q do
    local o = q[j]
    if j ~= i and o.granted and not compatible(t, o.mode) then
      return false
    end
  end
  return true
end

local function copy_queue(queue)
  local sim = {}
  for i = 1, #queue do
    local e = queue[i]
    sim[i] = { mode = e.mode, granted = e.granted, conv = e.conv }
  end
  return sim
end

-- Twin of dlock_core::grant::decide: conversions first (each settled before the next is considered),
-- then every waiting entry grantable against the result. Returns { {'C'|'G', index}, ... }; the input is
-- not changed.
local function decide(queue)
  local sim = copy_queue(queue)
  local out = {}
  while true do
    local settled = nil
    for i = 1, #sim do
      if sim[i].granted and conversion_grantable(sim, i) then
        settled = i
        break
      end
    end
    if settled == nil then
      break
    end
    sim[settled].mode = sim[settled].conv
    sim[settled].conv = nil
    out[#out + 1] = { 'C', settled }
  end
  local grants = {}
  for i = 1, #sim do
    if not sim[i].granted and grantable(sim, i) then
      grants[#grants + 1] = i
    end
  end
  for _, i in ipairs(grants) do
    out[#out + 1] = { 'G', i }
  end
  return out
end

-- Twin of dlock_core::grant::conversion_deadlocks.
local function conversion_deadlocks(queue, index, target)
  local sim = copy_queue(queue)
  sim[index].conv = target
  local function blocks(from, to)
    return to ~= from and sim[to].granted and sim[to].conv ~= nil
      and not compatible(sim[from].conv, sim[to].mode)
  end
  local seen = {}
  local stack = { index }
  while #stack > 0 do
    local at = table.remove(stack)
    for nxt = 1, #sim do
      if blocks(at, nxt) then
        if nxt == index then
          return true
        end
        if not seen[nxt] then
          seen[nxt] = true
          stack[#stack + 1] = nxt
        end
      end
    end
  end
  return false
end

-- ---- the stored queue ----

local function open(key, channel)
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  local st = {
    key = key, channel = channel, q = {}, meta = {},
    now_us = s * 1000000 + us,
    changed = {}, removed = {}, wake = {}, dirty = false, meta_dirty = false,
  }
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local f, v = flat[i], flat[i + 1]
    if string.byte(f, 1) == 46 then
      st.meta[f] = tonumber(v)
    else
      local seq, mode, granted, conv, exp, tok =
        string.match(v, '^(%d+) (%d) ([01]) (%-?%d) (%d+) (%d+)$')
      if seq == nil then
        error('dlock: unreadable queue entry ' .. f .. ' in ' .. key)
      end
      local e = {
        owner = f, seq = tonumber(seq), mode = tonumber(mode), granted = granted == '1',
        exp = tonumber(exp), tok = tonumber(tok),
      }
      local c = tonumber(conv)
      if c >= 0 then
        e.conv = c
      end
      st.q[#st.q + 1] = e
    end
  end
  table.sort(st.q, function(a, b) return a.seq < b.seq end)
  return st
end

local function find(st, owner)
  for i, e in ipairs(st.q) do
    if e.owner == owner then
      return i
    end
  end
  return nil
end

local function touch(st, e)
  st.changed[e.owner] = e
  st.dirty = true
end

local function remove_at(st, i)
  local e = table.remove(st.q, i)
  e.gone = true
  st.removed[#st.removed + 1] = e.owner
  st.dirty = true
end

-- max(last + 1, now in µs): strictly increasing while the hash lives, and above every earlier value
-- after it was deleted, because it is only deleted once the clock has passed it. Exact as a Lua
-- double (below 2^53) until the year 2255.
local function next_counter(st, field)
  local v = math.max((st.meta[field] or 0) + 1, st.now_us)
  st.meta[field] = v
  st.meta_dirty = true
  st.dirty = true
  return v
end

-- Drops expired entries, then grants what the rule allows, with a fresh token per grant.
local function settle(st)
  local kept = {}
  for _, e in ipairs(st.q) do
    if e.exp > st.now_us then
      kept[#kept + 1] = e
    else
      e.gone = true
      st.removed[#st.removed + 1] = e.owner
      st.dirty = true
    end
  end
  st.q = kept
  for _, d in ipairs(decide(st.q)) do
    local e = st.q[d[2]]
    if d[1] == 'C' then
      e.mode = e.conv
      e.conv = nil
    else
      e.granted = true
    end
    e.tok = next_counter(st, '.tok')
    touch(st, e)
    st.wake[#st.wake + 1] = string.format('%s:%d:%.0f', e.owner, e.mode, e.tok)
  end
end

local function encode(e)
  return string.format('%.0f %d %d %d %.0f %.0f', e.seq, e.mode, e.granted and 1 or 0,
    e.conv or -1, e.exp, e.tok)
end

local function call_chunked(cmd, key, args)
  for i = 1, #args, 512 do
    redis.call(cmd, key, unpack(args, i, math.min(i + 511, #args)))
  end
end

-- Writes what changed, keeps the key's expiry at its longest-living entry (or counter), and names the
-- newly granted owners on the wake-up channel, each as `owner:mode:token` (a bare `owner` asks the
-- waiter to look for itself).
local function finish(st)
  local hwm = math.max(st.meta['.tok'] or 0, st.meta['.seq'] or 0)
  if st.dirty then
    if #st.q == 0 and hwm < st.now_us then
      redis.call('DEL', st.key)
    else
      call_chunked('HDEL', st.key, st.removed)
      local args = {}
      for owner, e in pairs(st.changed) do
        if not e.gone then
          args[#args + 1] = owner
          args[#args + 1] = encode(e)
        end
      end
      if st.meta_dirty then
        for f, v in pairs(st.meta) do
          args[#args + 1] = f
          args[#args + 1] = string.format('%.0f', v)
        end
      end
      call_chunked('HSET', st.key, args)
      local keep = hwm
      for _, e in ipairs(st.q) do
        if e.exp > keep then
          keep = e.exp
        end
      end
      redis.call('PEXPIREAT', st.key, string.format('%.0f', math.floor(keep / 1000) + 2))
    end
  end
  if #st.wake > 0 then
    redis.call(PUBLISH, st.channel, table.concat(st.wake, ' '))
  end
end

-- Milliseconds until the earliest expiry among the entries that keep entry i waiting; -1 if none.
local function wait_ms(st, i)
  local me = st.q[i]
  local best = nil
  for j, o in ipairs(st.q) do
    if j ~= i then
      local blocks
      if me.granted then
        blocks = o.granted and not compatible(me.conv, o.mode)
      else
        blocks = ((j < i or o.granted) and not compatible(me.mode, o.mode))
          or (o.conv ~= nil and not compatible(me.mode, o.conv))
      end
      if blocks and (best == nil or o.exp < best) then
        best = o.exp
      end
    end
  end
  if best == nil then
    return -1
  end
  return math.ceil((best - st.now_us) / 1000)
end

local function state_reply(st, i)
  local e = st.q[i]
  if e.granted and e.conv == nil then
    return { 'G', e.mode, e.tok }
  end
  -- The token held (0 before the first grant): a wake-up carrying a grant counts only above it.
  return { 'W', wait_ms(st, i), e.tok }
end
"#;

/// `KEYS[1]` queue; `ARGV`: channel, owner, mode, ttl ms, wait (`1`/`0`).
/// Replies `{'G', mode, token}`, `{'W', ms, token held}` or `{'WB'}`.
const ENQUEUE: &str = r#"
local st = open(KEYS[1], ARGV[1])
settle(st)
local owner, mode, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local i = find(st, owner)
if i == nil then
  local e = {
    owner = owner, seq = math.max((st.meta['.seq'] or 0) + 1, st.now_us), mode = mode,
    granted = false, exp = st.now_us + ttl * 1000, tok = 0,
  }
  st.q[#st.q + 1] = e
  if ARGV[5] ~= '1' and not grantable(st.q, #st.q) then
    st.q[#st.q] = nil
    finish(st)
    return { 'WB' }
  end
  next_counter(st, '.seq')
  touch(st, e)
  settle(st)
  i = find(st, owner)
end
local reply = state_reply(st, i)
finish(st)
return reply
"#;

/// `KEYS[1]` queue; `ARGV`: channel, owner. Replies `{'G', …}`, `{'W', …}` or `{'L'}`.
const WAIT_CHECK: &str = r#"
local st = open(KEYS[1], ARGV[1])
settle(st)
local i = find(st, ARGV[2])
local reply
if i == nil then
  reply = { 'L' }
else
  reply = state_reply(st, i)
end
finish(st)
return reply
"#;

/// `KEYS[1]` queue; `ARGV`: channel, owner, ttl ms. Replies `{'OK'}` or `{'L'}`.
const RENEW: &str = r#"
local st = open(KEYS[1], ARGV[1])
settle(st)
local i = find(st, ARGV[2])
local reply = { 'L' }
if i ~= nil then
  local e = st.q[i]
  e.exp = st.now_us + tonumber(ARGV[3]) * 1000
  touch(st, e)
  reply = { 'OK' }
end
finish(st)
return reply
"#;

/// `KEYS[k]` the queue of the k-th renewal; `ARGV[3k-2..3k]` its channel, owner and ttl ms. Replies
/// one `'OK'` or `'L'` per renewal, as [`RENEW`] would. Stand-alone servers only: a cluster refuses
/// keys of several slots in one script.
const RENEW_MANY: &str = r#"
local replies = {}
for k = 1, #KEYS do
  local st = open(KEYS[k], ARGV[3 * k - 2])
  settle(st)
  local i = find(st, ARGV[3 * k - 1])
  replies[k] = 'L'
  if i ~= nil then
    local e = st.q[i]
    e.exp = st.now_us + tonumber(ARGV[3 * k]) * 1000
    touch(st, e)
    replies[k] = 'OK'
  end
  finish(st)
end
return replies
"#;

/// `KEYS[1]` queue; `ARGV`: channel, owner. Replies `{'OK'}`, also when the entry is gone.
const RELEASE: &str = r#"
local st = open(KEYS[1], ARGV[1])
local i = find(st, ARGV[2])
if i ~= nil then
  remove_at(st, i)
end
settle(st)
finish(st)
return { 'OK' }
"#;

/// `KEYS[1]` queue; `ARGV`: channel, owner, mode. Replies `{'G', …}`, `{'W', …}`, `{'L'}`, `{'NG'}`
/// (not granted yet) or `{'D', held mode}` (deadlock; nothing changed).
const CONVERT: &str = r#"
local st = open(KEYS[1], ARGV[1])
settle(st)
local i = find(st, ARGV[2])
if i == nil then
  finish(st)
  return { 'L' }
end
local e = st.q[i]
local mode = tonumber(ARGV[3])
if not e.granted then
  finish(st)
  return { 'NG' }
end
if mode == e.mode then
  if e.conv ~= nil then
    -- A waiter for the cancelled conversion now has its answer: the mode it holds.
    st.wake[#st.wake + 1] = e.owner
  end
  e.conv = nil
  touch(st, e)
else
  if conversion_deadlocks(st.q, i, mode) then
    finish(st)
    return { 'D', e.mode }
  end
  e.conv = mode
  touch(st, e)
end
settle(st)
local reply = state_reply(st, find(st, ARGV[2]))
finish(st)
return reply
"#;

/// `KEYS[1]` queue; `ARGV`: channel. Replies `owner, seq, mode, granted, conv, token` per entry, in
/// order (`token` is the current grant's, `0` while waiting).
const INSPECT: &str = r#"
local st = open(KEYS[1], ARGV[1])
settle(st)
local out = {}
for _, e in ipairs(st.q) do
  out[#out + 1] = e.owner
  out[#out + 1] = e.seq
  out[#out + 1] = e.mode
  out[#out + 1] = e.granted and 1 or 0
  out[#out + 1] = e.conv or -1
  out[#out + 1] = e.granted and e.tok or 0
end
finish(st)
return out
"#;

/// `KEYS[1]` fence register `{<prefix>:<encoded name>}:f`; `ARGV[1]`: the floor (a `u64` in decimal).
/// Raises the register to the floor if it is lower and replies its value afterwards (a decimal
/// string; `0` when it was never raised).
///
/// Stand-alone (no prelude): it neither reads nor touches the queue. The value is compared as a
/// string of digits, never as a Lua number (a double, exact only below 2^53), so every `u64` is exact.
/// It is written with a plain `SET`: no expiry, so it outlives the name's queue and survives a restart
/// as far as the server persists its data.
const FENCE: &str = r#"
local function digits(s, what)
  if type(s) ~= 'string' or not string.match(s, '^%d+$') then
    error('dlock: ' .. what .. ' is not a fence value: ' .. tostring(s))
  end
  s = string.gsub(s, '^0+', '')
  if s == '' then
    return '0'
  end
  if #s > 20 then
    error('dlock: ' .. what .. ' is too large for a fence value: ' .. s)
  end
  return s
end
-- a > b for decimal strings without leading zeros: longer is larger, else the first differing digit.
local function greater(a, b)
  if #a ~= #b then
    return #a > #b
  end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x > y
    end
  end
  return false
end
local floor = digits(ARGV[1], 'the floor')
local stored = redis.call('GET', KEYS[1])
local current = '0'
if stored then
  current = digits(stored, 'the value stored at ' .. KEYS[1])
end
if greater(floor, current) then
  redis.call('SET', KEYS[1], floor)
  return floor
end
return current
"#;

/// No keys; `ARGV`: n, then `mode granted conv` per entry. Replies `kind, index` pairs (1 = grant,
/// 2 = convert; 0-based indices).
#[cfg(feature = "test-support")]
const TWIN_DECIDE: &str = r#"
local function read_queue(from)
  local q = {}
  local n = tonumber(ARGV[from])
  for i = 1, n do
    local b = from + (i - 1) * 3
    local e = { mode = tonumber(ARGV[b + 1]), granted = ARGV[b + 2] == '1' }
    local c = tonumber(ARGV[b + 3])
    if c >= 0 then
      e.conv = c
    end
    q[i] = e
  end
  return q
end
if ARGV[1] == 'decide' then
  local out = {}
  for _, d in ipairs(decide(read_queue(2))) do
    out[#out + 1] = d[1] == 'G' and 1 or 2
    out[#out + 1] = d[2] - 1
  end
  return out
end
local q = read_queue(4)
if conversion_deadlocks(q, tonumber(ARGV[2]) + 1, tonumber(ARGV[3])) then
  return 1
end
return 0
"#;

/// The scripts of one driver, compiled for its publish command.
pub(crate) struct Scripts {
    pub enqueue: redis::Script,
    pub wait_check: redis::Script,
    pub renew: redis::Script,
    pub renew_many: redis::Script,
    pub release: redis::Script,
    pub convert: redis::Script,
    pub inspect: redis::Script,
    /// [`FENCE`]: stand-alone, without the prelude.
    pub fence: redis::Script,
    #[cfg(feature = "test-support")]
    pub twin: redis::Script,
}

/// The full text of a script: the prelude for `publish` (`PUBLISH` or `SPUBLISH`) followed by `body`.
fn script_source(publish: &str, body: &str) -> String {
    let prelude = PRELUDE
        .replace("@PUBLISH@", publish)
        .replace("@COMPAT@", &compat_table());
    format!("{prelude}\n{body}")
}

impl Scripts {
    pub(crate) fn new(publish: &str) -> Self {
        let s = |body| redis::Script::new(&script_source(publish, body));
        Scripts {
            enqueue: s(ENQUEUE),
            wait_check: s(WAIT_CHECK),
            renew: s(RENEW),
            renew_many: s(RENEW_MANY),
            release: s(RELEASE),
            convert: s(CONVERT),
            inspect: s(INSPECT),
            fence: redis::Script::new(FENCE),
            #[cfg(feature = "test-support")]
            twin: s(TWIN_DECIDE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compat_table_is_core_matrix() {
        let t = compat_table();
        assert!(t.starts_with("{{true,true,true,true,true,true},{true,true,true,true,true,false},"));
        assert_eq!(t.matches("true").count(), 20);
    }

    #[test]
    fn every_placeholder_is_filled() {
        let src = script_source("SPUBLISH", ENQUEUE);
        assert!(!src.contains('@'), "{src}");
        assert!(src.contains("local PUBLISH = 'SPUBLISH'"));
    }
}
