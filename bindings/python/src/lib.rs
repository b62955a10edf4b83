//! `diffuse._native`: the Rust half of the `diffuse` Python package. The Python half
//! (`python/diffuse/__init__.py`) turns keyword arguments into the `diffuse` command's options,
//! images into files or arrays, and results into numpy arrays and dicts; this half parses those
//! options with the command's own parser ([`diffuse::cli`]) and runs the library, so a Python
//! call and the command with the same options make the same bits.
//!
//! Every function here: releases the GIL while it works; checks for Ctrl-C (and calls the
//! caller's progress function) after every sampling or training step, stopping the work when
//! either raises; turns errors into Python exceptions with the command's one-line message
//! (`FileNotFoundError` when a named file or folder does not exist, `ModelError` when a model
//! cannot be loaded, `ValueError` otherwise); and catches panics, which reach Python as a
//! `RuntimeError` instead of unwinding into the interpreter.

use anyhow::anyhow;
use burn::tensor::Tensor;
use diffuse::cli::{self, Cmd};
use diffuse::pipeline::{Generated, Generator, Step};
use diffuse::weights::HostTensor;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pyo3::create_exception!(
    _native,
    ModelError,
    PyException,
    "A model file or folder that cannot be loaded: not a model, corrupt, or of an unknown layout."
);

/// What an error from the library becomes when nothing in it says otherwise.
#[derive(Clone, Copy)]
enum Kind {
    Value,
    Model,
}

/// An error from the library as a Python exception with its one-line message.
fn py_error(e: anyhow::Error, kind: Kind) -> PyErr {
    let msg = cli::one_line(&e);
    let missing = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    });
    if missing {
        return PyFileNotFoundError::new_err(msg);
    }
    match kind {
        Kind::Value => PyValueError::new_err(msg),
        Kind::Model => ModelError::new_err(msg),
    }
}

/// Runs `f` with panics caught: a panic becomes a `RuntimeError` naming it as a bug.
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(PyRuntimeError::new_err(format!(
            "internal error in diffuse (a bug; please report it): {}",
            diffuse::panic_message(payload.as_ref())
        )))
    })
}

/// Parses `options` as those of `diffuse COMMAND` (after the command's name).
fn parse(command: &str, options: Vec<String>) -> PyResult<cli::Cli> {
    let argv = ["diffuse".to_string(), command.to_string()]
        .into_iter()
        .chain(options);
    cli::parse(argv).map_err(clap_error)
}

/// A clap error as a `ValueError` with its first line (clap's message is several: the error, a
/// usage line, a hint).
fn clap_error(e: clap::Error) -> PyErr {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    PyValueError::new_err(first.strip_prefix("error: ").unwrap_or(first).to_string())
}

/// What the caller's progress function and Ctrl-C say after a step: the first exception
/// raised is kept in `stop`, and the work is told to stop.
struct Interrupt {
    callback: Option<Py<PyAny>>,
    stop: Option<PyErr>,
}

impl Interrupt {
    fn new(callback: Option<Py<PyAny>>) -> Self {
        Self {
            callback,
            stop: None,
        }
    }

    /// Checks for Ctrl-C and calls the progress function with `args`; false once either
    /// raised (then and ever after).
    fn step(
        &mut self,
        args: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyTuple>>,
    ) -> bool {
        if self.stop.is_some() {
            return false;
        }
        let outcome = Python::attach(|py| {
            py.check_signals()?;
            if let Some(cb) = &self.callback {
                cb.call1(py, args(py)?)?;
            }
            Ok::<(), PyErr>(())
        });
        match outcome {
            Ok(()) => true,
            Err(e) => {
                self.stop = Some(e);
                false
            }
        }
    }

    /// The work's result, or the exception that stopped it.
    fn finish<T>(self, result: anyhow::Result<T>, kind: Kind) -> PyResult<T> {
        match (self.stop, result) {
            (Some(e), _) => Err(e),
            (None, r) => r.map_err(|e| py_error(e, kind)),
        }
    }
}

/// The images of a run as bytes: `uint8` pixels (clamped to `[-1, 1]`, then rounded, as the
/// command writes them) or `float32` values (native byte order), `[N, C, H, W]`.
#[derive(Default)]
struct Images {
    float: bool,
    bytes: Vec<u8>,
    shape: Option<[usize; 4]>,
}

impl Images {
    fn push(&mut self, images: Tensor<4>) {
        let [n, c, h, w] = images.dims();
        if self.float {
            let v: Vec<f32> = images
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("f32 tensor");
            self.bytes.extend(v.iter().flat_map(|x| x.to_ne_bytes()));
        } else {
            self.bytes
                .extend(diffuse::imageio::ImageBatch::from_tensor(images).pixels);
        }
        let total = self.shape.map_or(0, |s| s[0]) + n;
        self.shape = Some([total, c, h, w]);
    }

    fn into_py(self, py: Python<'_>) -> (Py<PyBytes>, Vec<usize>) {
        let shape = self.shape.map_or(vec![0, 0, 0, 0], |s| s.to_vec());
        (PyBytes::new(py, &self.bytes).unbind(), shape)
    }
}

/// A loaded model of any family, ready to generate (`diffuse.Pipeline` wraps it).
#[pyclass(module = "diffuse._native", frozen)]
struct Model {
    generator: Generator,
}

#[pymethods]
impl Model {
    /// Loads a model: `None` for the embedded Fashion-MNIST model, a shipped model's name, a
    /// run folder, a model file or a diffusers pipeline folder.
    #[staticmethod]
    #[pyo3(signature = (spec=None))]
    fn load(py: Python<'_>, spec: Option<String>) -> PyResult<Self> {
        guarded(|| {
            let generator = py.detach(|| {
                let dev = diffuse::device::inference_device();
                Generator::load(spec.as_deref(), &dev)
            });
            generator
                .map(|generator| Self { generator })
                .map_err(|e| py_error(e, Kind::Model))
        })
    }

    /// The model as JSON: family, source, image shape `[C, H, W]`, class names, whether it
    /// takes text, its config.
    fn info(&self) -> PyResult<String> {
        guarded(|| {
            let g = &self.generator;
            let cond = g.cond();
            let v = serde_json::json!({
                "family": g.family().name(),
                "source": g.source(),
                "shape": g.output_shape(),
                "class_names": cond.num_classes.map(|_| cond.class_names.to_vec()),
                "num_classes": cond.num_classes,
                "text": cond.text,
                "config": g.config_json().map_err(|e| py_error(e, Kind::Value))?,
            });
            Ok(v.to_string())
        })
    }

    /// Generates as `diffuse sample OPTIONS` would (the same request, so the same bits):
    /// returns the images' bytes and shape `[N, C, H, W]`. `noise`: `x_T` as native-order
    /// float32 bytes and its shape `[N, C, H, W]` (the command's `--init-noise`).
    /// `progress(step, total)` is called after every step.
    #[pyo3(signature = (options, noise=None, float=false, progress=None))]
    fn generate(
        &self,
        py: Python<'_>,
        options: Vec<String>,
        noise: Option<(Vec<u8>, Vec<usize>)>,
        float: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<(Py<PyBytes>, Vec<usize>)> {
        guarded(|| {
            let parsed = parse("sample", options)?;
            let Cmd::Sample(a) = parsed.cmd else {
                unreachable!("parsed as sample")
            };
            let init = match noise {
                None => None,
                Some((bytes, shape)) => Some(noise_tensor(&bytes, shape)?),
            };
            self.images(
                py,
                parsed.precision,
                float,
                progress,
                |g, on_step, cancel, images| {
                    let (mut req, _cols) = cli::sample::request(&a, g, init.map(|t| (t, "noise")))?;
                    req.cancel = Some(cancel);
                    g.run_chunks(&req, on_step, &mut |_, out: Generated| {
                        images.push(out.images);
                        Ok(())
                    })
                    .map(drop)
                },
            )
        })
    }

    /// Edits as `diffuse edit OPTIONS` would (`--image` and `--mask` are files): the edits'
    /// bytes and shape.
    #[pyo3(signature = (options, float=false, progress=None))]
    fn edit(
        &self,
        py: Python<'_>,
        options: Vec<String>,
        float: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<(Py<PyBytes>, Vec<usize>)> {
        guarded(|| {
            let parsed = parse("edit", options)?;
            let Cmd::Edit(a) = parsed.cmd else {
                unreachable!("parsed as edit")
            };
            self.images(
                py,
                parsed.precision,
                float,
                progress,
                |g, on_step, cancel, images| {
                    let pipe = diffusion(g, "edit")?;
                    let (out, _) = cli::edit::edit(&a, pipe, on_step, Some(cancel))?;
                    images.push(out.images);
                    Ok(())
                },
            )
        })
    }

    /// Enlarges as `diffuse upscale OPTIONS` would (`--image` is a file): the versions' bytes
    /// and shape.
    #[pyo3(signature = (options, float=false, progress=None))]
    fn upscale(
        &self,
        py: Python<'_>,
        options: Vec<String>,
        float: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<(Py<PyBytes>, Vec<usize>)> {
        guarded(|| {
            let parsed = parse("upscale", options)?;
            let Cmd::Upscale(a) = parsed.cmd else {
                unreachable!("parsed as upscale")
            };
            self.images(
                py,
                parsed.precision,
                float,
                progress,
                |g, on_step, cancel, images| {
                    let pipe = diffusion(g, "upscale")?;
                    images.push(cli::upscale::upscale(&a, pipe, on_step, Some(cancel))?.images);
                    Ok(())
                },
            )
        })
    }
}

impl Model {
    /// Runs `work` on the model without the GIL, in the command's `precision`, with Ctrl-C
    /// and `progress(step, total)` checked after every step (either raising stops the run);
    /// returns the images it kept, as bytes and shape.
    fn images(
        &self,
        py: Python<'_>,
        precision: Option<diffuse::kernels::MatmulMode>,
        float: bool,
        progress: Option<Py<PyAny>>,
        work: impl FnOnce(
            &Generator,
            &mut dyn FnMut(&Step),
            Arc<AtomicBool>,
            &mut Images,
        ) -> anyhow::Result<()>
        + Send,
    ) -> PyResult<(Py<PyBytes>, Vec<usize>)> {
        let model = &self.generator;
        let mut interrupt = Interrupt::new(progress);
        let mut images = Images {
            float,
            ..Default::default()
        };
        let result = py.detach(|| {
            cli::set_precision(precision)?;
            let cancel = Arc::new(AtomicBool::new(false));
            let stop = cancel.clone();
            let mut on_step = |s: &Step| {
                let done = s.chunk * s.total + s.index + 1;
                let total = s.total * s.chunks;
                if !interrupt.step(|py| (done, total).into_pyobject(py)) {
                    stop.store(true, Ordering::Relaxed);
                }
            };
            work(model, &mut on_step, cancel, &mut images)
        });
        interrupt.finish(result, Kind::Value)?;
        Ok(images.into_py(py))
    }
}

/// The diffusion pipeline of a model, or the command's refusal of another family.
fn diffusion<'a>(g: &'a Generator, what: &str) -> anyhow::Result<&'a diffuse::pipeline::Pipeline> {
    g.as_diffusion().ok_or_else(|| {
        anyhow!(
            "{what} is for diffusion models; {} is {}",
            g.source(),
            g.family().article_name()
        )
    })
}

/// Given initial noise from its bytes (native-order float32) and shape.
fn noise_tensor(bytes: &[u8], shape: Vec<usize>) -> PyResult<HostTensor> {
    let count: usize = shape.iter().product();
    if bytes.len() != count * 4 {
        return Err(PyValueError::new_err(format!(
            "noise: {} bytes do not hold float32 values of shape {shape:?}",
            bytes.len()
        )));
    }
    let data = bytes
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(HostTensor { shape, data })
}

/// Trains as `diffuse train OPTIONS` would; `callback(step, total, loss, lr, elapsed)` after
/// every step. Ctrl-C (or an exception from the callback) stops the run after that step,
/// with its checkpoint written (`resume` continues), and is raised.
#[pyfunction]
#[pyo3(signature = (options, callback=None))]
fn train(py: Python<'_>, options: Vec<String>, callback: Option<Py<PyAny>>) -> PyResult<()> {
    guarded(|| {
        let parsed = parse("train", options)?;
        let Cmd::Train(a) = parsed.cmd else {
            unreachable!("parsed as train")
        };
        let mut interrupt = Interrupt::new(callback);
        let result = py.detach(|| {
            cli::set_precision(parsed.precision)?;
            cli::train::run_with(
                *a,
                Some(&mut |r: &diffuse::train::StepReport| {
                    if interrupt
                        .step(|py| (r.step, r.total, r.loss, r.lr, r.elapsed).into_pyobject(py))
                    {
                        Ok(())
                    } else {
                        Err(anyhow!("stopped at step {}", r.step))
                    }
                }),
            )
        });
        interrupt.finish(result, Kind::Value)
    })
}

/// `diffuse fid OPTIONS`: the report as JSON.
#[pyfunction]
fn fid(py: Python<'_>, options: Vec<String>) -> PyResult<String> {
    guarded(|| {
        let parsed = parse("fid", options)?;
        let Cmd::Fid(a) = parsed.cmd else {
            unreachable!("parsed as fid")
        };
        py.detach(|| cli::eval::fid(a))
            .map(|v| v.to_string())
            .map_err(|e| py_error(e, Kind::Value))
    })
}

/// `diffuse eval OPTIONS`: the report as JSON.
#[pyfunction]
fn eval(py: Python<'_>, options: Vec<String>) -> PyResult<String> {
    guarded(|| {
        let parsed = parse("eval", options)?;
        let Cmd::Eval(a) = parsed.cmd else {
            unreachable!("parsed as eval")
        };
        py.detach(|| {
            cli::set_precision(parsed.precision)?;
            cli::eval::eval_cmd(a)
        })
        .map(|v| v.to_string())
        .map_err(|e| py_error(e, Kind::Value))
    })
}

/// Runs a whole `diffuse` command line (after the program's name) for the commands whose work
/// is files: `fetch`, `export`, `convert`.
#[pyfunction]
fn run(py: Python<'_>, options: Vec<String>) -> PyResult<()> {
    guarded(|| {
        let argv = std::iter::once("diffuse".to_string()).chain(options);
        let parsed = cli::parse(argv).map_err(clap_error)?;
        py.detach(|| cli::run(parsed))
            .map_err(|e| py_error(e, Kind::Value))
    })
}

/// The options of `diffuse COMMAND` as JSON: `[{"name", "flag", "positional"}]`, where `name`
/// is the keyword argument (`min_snr` for `--min-snr`) and `flag` says it takes no value.
#[pyfunction]
fn options(command: &str) -> PyResult<String> {
    guarded(|| {
        let cmd = cli::command();
        let Some(sub) = cmd.find_subcommand(command) else {
            return Err(PyValueError::new_err(format!("no command '{command}'")));
        };
        let list: Vec<serde_json::Value> = sub
            .get_arguments()
            .chain(cmd.get_arguments())
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .map(|a| {
                serde_json::json!({
                    "name": a.get_id().as_str(),
                    "flag": !a.get_action().takes_values(),
                    "positional": a.is_positional(),
                })
            })
            .collect();
        Ok(serde_json::Value::from(list).to_string())
    })
}

/// Panics with `message`: the test that no panic crosses into Python calls it.
#[pyfunction]
fn _panic(message: &str) -> PyResult<()> {
    let message = message.to_string();
    guarded(move || panic!("{message}"))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // As the command does first thing: freed tensor buffers stay in the process for the next
    // step instead of going back to the kernel, which must zero them again (without it,
    // `generate` ran 17% slower than `diffuse sample`; `scripts/python_overhead.py`). glibc's
    // mallopt takes the allocator's lock, so other threads of the interpreter are no hazard.
    diffuse::device::keep_freed_memory();
    m.add_class::<Model>()?;
    m.add("ModelError", m.py().get_type::<ModelError>())?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(fid, m)?)?;
    m.add_function(wrap_pyfunction!(eval, m)?)?;
    m.add_function(wrap_pyfunction!(options, m)?)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_function(wrap_pyfunction!(_panic, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
