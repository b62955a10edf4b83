//! Named tensors: moving module parameters to and from safetensors files, and writing files
//! atomically (temp file, then rename) so that a kill never leaves a half-written file.

use anyhow::{Context, Result, anyhow, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};
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
            bail!("{first} (and {more} more problems)");
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

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d)
            .with_context(|| format!("cannot create folder {}", d.display()))?;
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move file into {}", path.display()))
}

/// Serialises named tensors (and string metadata) in the safetensors format.
pub fn to_safetensors(
    tensors: &NamedTensors,
    metadata: &HashMap<String, String>,
    dtype: StoreDtype,
) -> Result<Vec<u8>> {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes = match dtype {
                StoreDtype::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                StoreDtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            (name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let st_dtype = match dtype {
        StoreDtype::F32 => Dtype::F32,
        StoreDtype::F16 => Dtype::F16,
    };
    let views = bufs
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(st_dtype, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    Ok(safetensors::serialize(views, &meta)?)
}

/// Parses a safetensors buffer: every tensor as f32 (from F32, F16, BF16, F64 or I64) and the
/// metadata.
/// `what` names the input in error messages.
pub fn from_safetensors(
    bytes: &[u8],
    what: &str,
) -> Result<(NamedTensors, HashMap<String, String>)> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{what} is not a valid safetensors file ({e})"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow!("{what} is not a valid safetensors file ({e})"))?;
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
        out.insert(
            name.clone(),
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Reads a safetensors file, naming the path in every error.
pub fn read_safetensors(path: &Path) -> Result<(NamedTensors, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    from_safetensors(&bytes, &path.display().to_string())
}
