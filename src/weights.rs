//! Named tensors: moving module parameters to and from safetensors files.

use anyhow::{Result, anyhow, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One tensor on the host: shape and f32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Tensors by name, in a stable order.
pub type NamedTensors = BTreeMap<String, HostTensor>;

/// Storage precision of a safetensors file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreDtype {
    F32,
    F16,
}

struct Collector<'a> {
    path: Vec<String>,
    prefix: &'a str,
    out: &'a mut NamedTensors,
}

impl ModuleVisitor for Collector<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 parameter data");
        let name = format!("{}{}", self.prefix, self.path.join("."));
        self.out.insert(name, HostTensor { shape, data });
    }
}

/// Every float parameter of `module`, named by its field path (`down.0.blocks.1.conv1.weight`)
/// with `prefix` in front.
pub fn collect<M: Module>(module: &M, prefix: &str, out: &mut NamedTensors) {
    let mut c = Collector {
        path: Vec::new(),
        prefix,
        out,
    };
    module.visit(&mut c);
}

struct Loader<'a> {
    path: Vec<String>,
    prefix: &'a str,
    source: &'a NamedTensors,
    errors: Vec<String>,
    used: usize,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = format!("{}{}", self.prefix, self.path.join("."));
        let Some(src) = self.source.get(&name) else {
            self.errors.push(format!("tensor '{name}' is missing"));
            return param;
        };
        let (id, old, mapper) = param.consume();
        let want = old.dims().to_vec();
        if src.shape != want {
            self.errors.push(format!(
                "tensor '{name}' has shape {:?}, the model expects {:?}",
                src.shape, want
            ));
            return Param::from_mapped_value(id, old, mapper);
        }
        self.used += 1;
        let grad = old.is_require_grad();
        let dev = old.device();
        let mut t = Tensor::<D>::from_data(TensorData::new(src.data.clone(), want), &dev);
        if grad {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

/// Replaces every float parameter of `module` with the tensor named `prefix + path` in
/// `source`. Fails naming the first missing or mis-shaped tensor.
pub fn apply<M: Module>(module: M, source: &NamedTensors, prefix: &str) -> Result<M> {
    let mut l = Loader {
        path: Vec::new(),
        prefix,
        source,
        errors: Vec::new(),
        used: 0,
    };
    let m = module.map(&mut l);
    if let Some(first) = l.errors.first() {
        let more = l.errors.len() - 1;
        if more > 0 {
            let s = if more == 1 { "" } else { "s" };
            bail!("{first} (and {more} more problem{s})");
        }
        bail!("{first}");
    }
    Ok(m)
}

/// A 2-d tensor transposed: `[r, c]` to `[c, r]` (PyTorch's `Linear` weights are `[out, in]`,
/// burn's `[in, out]`).
pub fn transpose(t: &HostTensor) -> HostTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut data = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            data[j * r + i] = t.data[i * c + j];
        }
    }
    HostTensor {
        shape: vec![c, r],
        data,
    }
}

/// Metadata key of the SHA-256 of a file's tensor data (everything after the header), in
/// lowercase hex. Written into every safetensors file diffuse saves and checked on every load;
/// other readers see one more metadata string and load the file as before.
pub const CHECKSUM_KEY: &str = "diffuse.sha256";

/// The SHA-256 of `data` in lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serialises named tensors (and string metadata) in the safetensors format: an 8-byte
/// little-endian header length, the JSON header (padded with spaces to a multiple of 8), then
/// the tensors' bytes in name order. Written here rather than by the `safetensors` crate so
/// that the bytes are a function of the contents alone: that crate writes the metadata map
/// in hash order, so two saves of one state differed (determinism). The metadata gains
/// [`CHECKSUM_KEY`].
pub fn to_safetensors(
    tensors: &NamedTensors,
    metadata: &HashMap<String, String>,
    dtype: StoreDtype,
) -> Result<Vec<u8>> {
    let (name, width) = match dtype {
        StoreDtype::F32 => ("F32", 4),
        StoreDtype::F16 => ("F16", 2),
    };
    let total: usize = tensors.values().map(|t| t.data.len() * width).sum();
    let mut data = Vec::with_capacity(total);
    let mut header = serde_json::Map::new();
    for (key, t) in tensors {
        if t.shape.iter().product::<usize>() != t.data.len() {
            bail!(
                "tensor '{key}' has {} values for shape {:?}",
                t.data.len(),
                t.shape
            );
        }
        let begin = data.len();
        match dtype {
            StoreDtype::F32 => data.extend(t.data.iter().flat_map(|v| v.to_le_bytes())),
            StoreDtype::F16 => data.extend(
                t.data
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes()),
            ),
        }
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": name, "shape": t.shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let mut meta: BTreeMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert(CHECKSUM_KEY.to_string(), sha256_hex(&data));
    // serde_json's map keeps keys sorted: the header is canonical.
    header.insert("__metadata__".to_string(), serde_json::to_value(&meta)?);
    let mut json = serde_json::to_vec(&header)?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend((json.len() as u64).to_le_bytes());
    out.extend(json);
    out.extend(data);
    Ok(out)
}

/// A `safetensors` parse error in a reader's words.
fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "it is shorter than a safetensors header (8 bytes)".into(),
        E::HeaderTooLarge => "its header claims to be over 100 MB long".into(),
        E::InvalidHeaderLength => {
            "its header claims to be longer than the whole file (truncated, or not safetensors)"
                .into()
        }
        E::InvalidHeader | E::InvalidHeaderStart => "its header is not UTF-8 JSON".into(),
        E::InvalidHeaderDeserialization => {
            "its header is not a valid safetensors table of tensors".into()
        }
        E::MetadataIncompleteBuffer => {
            "its tensors need more data than the file holds (truncated)".into()
        }
        E::TensorInvalidInfo | E::InvalidTensorView(..) => {
            "a tensor's shape does not match its data length".into()
        }
        E::InvalidOffset(name) => format!("tensor '{name}' has invalid data offsets"),
        E::ValidationOverflow => "a tensor's shape or offsets overflow".into(),
        E::TensorNotFound(name) => format!("tensor '{name}' is missing"),
        E::IoError(e) => crate::files::io_reason(e),
        E::JsonError(e) => format!("its header is not valid JSON ({e})"),
    }
}

/// Parses a safetensors buffer: every tensor as f32 (from F32, F16, BF16, F64 or I64) and the
/// metadata. A file with [`CHECKSUM_KEY`] must match it; every value must be finite.
/// `what` names the input in error messages.
pub fn from_safetensors(
    bytes: &[u8],
    what: &str,
) -> Result<(NamedTensors, HashMap<String, String>)> {
    let invalid = |e: safetensors::SafeTensorError| {
        anyhow!("{what} is not a valid safetensors file: {}", describe(&e))
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(invalid)?;
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(invalid)?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if let Some(want) = meta.get(CHECKSUM_KEY) {
        let data = &bytes[(8 + header_len).min(bytes.len())..];
        if sha256_hex(data) != want.to_lowercase() {
            bail!(
                "{what} is corrupt: its tensor data does not match the checksum it was saved with (the file was damaged after it was written; use another copy or train it again)"
            );
        }
    }
    let mut out = NamedTensors::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => bail!("{what}: tensor '{name}' has unsupported dtype {other:?}"),
        };
        if let Some(k) = data.iter().position(|v| !v.is_finite()) {
            bail!(
                "{what}: tensor '{name}' holds a value that is not finite ({} at index {k}): the file is damaged, or the training that wrote it diverged",
                data[k]
            );
        }
        out.insert(
            name.clone(),
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok((out, meta))
}

/// Prints a note when a diffuse file carries no checksum (written before checksums were
/// added): it loads, unverified.
/// `remedy` says how to get a file with one.
pub fn note_if_unverified(meta: &HashMap<String, String>, what: &str, remedy: &str) {
    if !meta.contains_key(CHECKSUM_KEY) {
        eprintln!(
            "note: {what} carries no checksum (written by an older diffuse), so damage to it cannot be detected; {remedy}"
        );
    }
}

/// Reads a safetensors file, naming the path in every error.
pub fn read_safetensors(path: &Path) -> Result<(NamedTensors, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| {
        anyhow!(
            "cannot read {}: {}",
            path.display(),
            crate::files::io_reason(&e)
        )
    })?;
    from_safetensors(&bytes, &path.display().to_string())
}
