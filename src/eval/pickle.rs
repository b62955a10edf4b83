//! A reader for the pickles inside TorchScript archives (`data.pkl`, protocol 2): enough of
//! Python's pickle machine to rebuild the module tree with its tensors (as references to the
//! archive's raw storages) and its plain attributes. Nothing is executed: classes stay names.

use anyhow::{Result, anyhow, bail};

/// A value of the pickle machine.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `module.name`, from GLOBAL.
    Global(String),
    /// An instance: its class and the state BUILD gave it.
    Object {
        class: String,
        state: Box<Value>,
    },
    /// A persistent id: `('storage', dtype, key, location, numel)`.
    Storage {
        dtype: String,
        key: String,
    },
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
    Tensor {
        dtype: String,
        key: String,
        offset: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
    },
    /// Another call result we do not model (e.g. `OrderedDict()`).
    Call(String),
    Mark,
}

/// The most values a pickle may build (memo references copy values here).
const MAX_VALUES: usize = 1_000_000;
/// The deepest nesting accepted.
const MAX_DEPTH: usize = 64;

/// Number of values in `v`, counting no further than `cap`.
fn count(v: &Value, cap: usize) -> usize {
    let children: &[Value] = match v {
        Value::Tuple(t) | Value::List(t) => t,
        Value::Dict(d) => {
            let mut n = 1;
            for (k, x) in d {
                if n > cap {
                    break;
                }
                n += count(k, cap - n) + count(x, cap.saturating_sub(n));
            }
            return n;
        }
        Value::Object { state, .. } => return 1 + count(state, cap.saturating_sub(1)),
        _ => return 1,
    };
    let mut n = 1;
    for c in children {
        if n > cap {
            break;
        }
        n += count(c, cap - n);
    }
    n
}

/// The most values the nesting checks may visit in one parse: a bound on the work a hostile
/// pickle can cause (a self-referencing list grown op by op was seen to take minutes).
const MAX_VISITS: usize = 10_000_000;

/// Nesting depth of `v`, counting no further than `cap + 1`; every value looked at is added
/// to `visits`.
fn depth(v: &Value, cap: usize, visits: &mut usize) -> usize {
    *visits += 1;
    if cap == 0 || *visits > MAX_VISITS {
        return 1;
    }
    let sub = match v {
        Value::Tuple(t) | Value::List(t) => t.iter().map(|c| depth(c, cap - 1, visits)).max(),
        Value::Dict(d) => d
            .iter()
            .map(|(k, x)| depth(k, cap - 1, visits).max(depth(x, cap - 1, visits)))
            .max(),
        Value::Object { state, .. } => Some(depth(state, cap - 1, visits)),
        _ => None,
    };
    1 + sub.unwrap_or(0)
}

fn as_usize_list(v: &Value) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(t) | Value::List(t) => t
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as usize),
                other => Err(anyhow!("expected a size, found {other:?}")),
            })
            .collect(),
        other => Err(anyhow!("expected a tuple of sizes, found {other:?}")),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8> {
        let v = *self
            .b
            .get(self.pos)
            .ok_or_else(|| anyhow!("pickle ends early"))?;
        self.pos += 1;
        Ok(v)
    }
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| anyhow!("pickle ends early"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn line(&mut self) -> Result<String> {
        let start = self.pos;
        while self.u8()? != b'\n' {}
        Ok(String::from_utf8_lossy(&self.b[start..self.pos - 1]).into_owned())
    }
}

/// Parses a pickle into its top-level value.
pub fn parse(bytes: &[u8]) -> Result<Value> {
    let mut r = Reader { b: bytes, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Value> = Default::default();
    // Memo keys of values still on the stack: Python's memo holds references, so a container
    // filled after it was memoised must be re-stored.
    let mut keys: Vec<(usize, u32)> = Vec::new();
    let mut built = 0usize;
    let mut visits = 0usize;
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| anyhow!("pickle stack underflow"));
    let pop_mark = |stack: &mut Vec<Value>| -> Result<Vec<Value>> {
        let m = stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or_else(|| anyhow!("pickle: no mark"))?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?;
            }
            b'.' => return pop(&mut stack),
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(format!("{module}.{name}")));
            }
            b'q' | b'r' => {
                let k = if op == b'q' { r.u8()? as u32 } else { r.u32()? };
                memo.insert(
                    k,
                    stack
                        .last()
                        .cloned()
                        .ok_or_else(|| anyhow!("empty stack"))?,
                );
                let slot = (stack.len() - 1, k);
                if !keys.contains(&slot) {
                    keys.push(slot);
                }
            }
            b'h' | b'j' => {
                let k = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let v = memo.get(&k).ok_or_else(|| anyhow!("pickle: memo {k}"))?;
                built += count(v, MAX_VALUES);
                if built > MAX_VALUES {
                    bail!("pickle builds more than {MAX_VALUES} values");
                }
                stack.push(v.clone());
            }
            b'(' => stack.push(Value::Mark),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    bail!("pickle stack underflow");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b'u' => {
                let items = pop_mark(&mut stack)?;
                if let Some(Value::Dict(d)) = stack.last_mut() {
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                } else {
                    bail!("pickle: SETITEMS on a non-dict");
                }
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                if let Some(Value::Dict(d)) = stack.last_mut() {
                    d.push((k, v));
                } else {
                    bail!("pickle: SETITEM on a non-dict");
                }
            }
            b'a' => {
                let v = pop(&mut stack)?;
                if let Some(Value::List(l)) = stack.last_mut() {
                    l.push(v);
                } else {
                    bail!("pickle: APPEND on a non-list");
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                if let Some(Value::List(l)) = stack.last_mut() {
                    l.extend(items);
                } else {
                    bail!("pickle: APPENDS on a non-list");
                }
            }
            b'J' => {
                let v = i32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes"));
                stack.push(Value::Int(v as i64));
            }
            b'K' => {
                let v = r.u8()?;
                stack.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
                stack.push(Value::Int(v as i64));
            }
            0x8a => {
                let n = r.u8()? as usize;
                let bytes = r.take(n)?;
                let mut v: i64 = 0;
                for (i, b) in bytes.iter().enumerate().take(8) {
                    v |= (*b as i64) << (8 * i);
                }
                if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v));
            }
            b'G' => {
                let v = f64::from_be_bytes(r.take(8)?.try_into().expect("8 bytes"));
                stack.push(Value::Float(v));
            }
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(String::from_utf8_lossy(r.take(n)?).into_owned()));
            }
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'Q' => {
                let pid = pop(&mut stack)?;
                let Value::Tuple(t) = pid else {
                    bail!("pickle: unexpected persistent id {pid:?}");
                };
                match (t.first(), t.get(1), t.get(2)) {
                    (Some(Value::Str(s)), Some(Value::Global(dtype)), Some(Value::Str(key)))
                        if s == "storage" =>
                    {
                        stack.push(Value::Storage {
                            dtype: dtype.clone(),
                            key: key.clone(),
                        })
                    }
                    _ => bail!("pickle: unexpected persistent id {t:?}"),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                let Value::Global(name) = f else {
                    bail!("pickle: REDUCE of a non-global {f:?}");
                };
                let v = match (name.as_str(), args) {
                    ("torch._utils._rebuild_tensor_v2", Value::Tuple(a)) if a.len() >= 4 => {
                        let Value::Storage { dtype, key } = &a[0] else {
                            bail!("pickle: tensor without storage");
                        };
                        let offset = match a[1] {
                            Value::Int(o) if o >= 0 => o,
                            _ => bail!("pickle: tensor offset"),
                        };
                        Value::Tensor {
                            dtype: dtype.clone(),
                            key: key.clone(),
                            offset: offset as usize,
                            shape: as_usize_list(&a[2])?,
                            stride: as_usize_list(&a[3])?,
                        }
                    }
                    (n, Value::Tuple(mut a))
                        if n.starts_with("torch.jit._pickle.build_") && a.len() == 1 =>
                    {
                        a.remove(0)
                    }
                    _ => Value::Call(name),
                };
                stack.push(v);
            }
            0x81 => {
                let _args = pop(&mut stack)?;
                let cls = pop(&mut stack)?;
                let Value::Global(class) = cls else {
                    bail!("pickle: NEWOBJ of a non-global");
                };
                stack.push(Value::Object {
                    class,
                    state: Box::new(Value::None),
                });
            }
            b'b' => {
                let state = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::Object { state: s, .. }) => **s = state,
                    _ => bail!("pickle: BUILD on a non-object"),
                }
            }
            other => bail!(
                "pickle: unsupported opcode 0x{other:02x} at byte {}",
                r.pos - 1
            ),
        }
        if matches!(
            op,
            b't' | 0x85..=0x87 | b'u' | b's' | b'a' | b'e' | b'b' | b'R' | b'Q'
        ) && stack
            .last()
            .is_some_and(|top| depth(top, MAX_DEPTH, &mut visits) > MAX_DEPTH)
        {
            bail!("pickle nests deeper than {MAX_DEPTH} levels");
        }
        if visits > MAX_VISITS {
            bail!("pickle is too large to read (its values were visited over {MAX_VISITS} times)");
        }
        // Forget memo keys of slots this op popped or replaced (an op pushes at most one).
        let pushes = !matches!(op, 0x80 | b'q' | b'r' | b'u' | b's' | b'a' | b'e' | b'b');
        let low = stack.len() - usize::from(pushes && !stack.is_empty());
        keys.retain(|(slot, _)| *slot < low || matches!(op, b'q' | b'r'));
        if matches!(op, b'u' | b's' | b'a' | b'e' | b'b') {
            let top = stack.len().wrapping_sub(1);
            for (slot, k) in &keys {
                if *slot == top {
                    // A re-stored container is a copy: it counts as values built.
                    built += count(&stack[top], MAX_VALUES);
                    if built > MAX_VALUES {
                        bail!("pickle builds more than {MAX_VALUES} values");
                    }
                    memo.insert(*k, stack[top].clone());
                }
            }
        }
    }
}

/// Every tensor and every integer or integer-list attribute of an object tree, by dotted path
/// (`net.layers.conv.weight`, `net.layers.conv.stride`).
pub fn flatten(
    v: &Value,
    path: &str,
    tensors: &mut Vec<(String, Value)>,
    attrs: &mut Vec<(String, Value)>,
) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object { state, .. } => {
            if let Value::Dict(d) = state.as_ref() {
                for (k, val) in d {
                    if let Value::Str(k) = k {
                        flatten(val, &join(k), tensors, attrs);
                    }
                }
            }
        }
        Value::Tensor { .. } => tensors.push((path.to_string(), v.clone())),
        Value::Int(_) | Value::List(_) | Value::Tuple(_) => {
            attrs.push((path.to_string(), v.clone()))
        }
        _ => {}
    }
}
