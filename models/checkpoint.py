"""Reading and writing checkpoint files: the first step of the one weights path (read here, filter in
`focal_transformer.checkpoint_filter_fn`, load in `models.backbone`), which main.py's --resume,
--pretrained and auto-resume, the backbones and timm's pretrained loading all take.

`read_checkpoint(location)` takes a path or an http(s):// or file:// URL (`resolve`) and recognises
the file by its content:

- a PyTorch file (`torch.save`'s zip or the legacy pickle), read with `torch.load(weights_only=True)`:
  tensors and plain containers, and the yacs `CfgNode` that the original repository's training
  checkpoints pickle, rebuilt as an OrderedDict of its values. Its contents come back as saved.
- a safetensors file, read with the `safetensors` library: a state dict.
- a `.pdparams` (a pickle written by `paddle.save`, as PaddleViT publishes the released weights),
  read by an unpickler that rebuilds numeric numpy arrays and plain containers only. It comes back in
  the released layout (`from_paddle`).

No file runs code: nothing is ever unpickled without one of those two restrictions. Every way a
checkpoint can be unusable (missing, damaged, refused, of another architecture) raises a
`CheckpointError` whose message is one line naming the file.

`unwrap_state_dict` finds the model weights in any accepted layout; `key_mismatch` reports missing,
unexpected and wrong-shape keys in one line; `write_safetensors` converts.
"""
import collections
import hashlib
import os
import pickle
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from xml.etree import ElementTree

import numpy as np
import safetensors
import safetensors.torch
import torch

# Name prefixes a wrapped model adds: DistributedDataParallel and torch.compile (in either order).
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
# How many keys of each kind a mismatch report names before "(+N more)".
KEYS_SHOWN = 4
# How much of an HTTP error's body is read for an error code.
MAX_ERROR_BODY = 64 * 1024
# torch.save's legacy (non-zip) format begins with a pickle of its magic number: the opcode and
# bytes of that integer, found within a file's first bytes whatever the pickle protocol.
LEGACY_TORCH_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]
HEAD_BYTES = 32
ZIP_MAGIC = b'PK\x03\x04'
# How torch's restricted unpickler begins its error, and where it says what it refused.
WEIGHTS_ONLY_FAILURE = 'Weights only load failed'
UNPICKLER_FINDING = 'WeightsUnpickler error:'
# paddle.save's table of parameter variable names, beside the state dict's arrays.
PADDLE_NAME_TABLE = 'StructuredToParameterName@@'
# Array kinds a .pdparams may hold: bool, signed and unsigned integers, floats, complex numbers.
NUMERIC_KINDS = 'biufc'
# The second byte of a pickle of protocol 2 or later (paddle.save writes protocol 4).
PICKLE_PROTOCOLS = [bytes([protocol]) for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1)]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, refused, incomplete or made for another model;
    the message is one line naming the file."""


def error_line(err):
    """The message of `err` on one line. A DataLoader worker's error carries the worker's
    traceback, whose last line is the message; torch's restricted unpickler wraps its finding in
    advice to load the file unrestricted, which is left out."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith('Caught '):
        return lines[-1]
    if lines[0].startswith(WEIGHTS_ONLY_FAILURE):
        findings = [line for line in lines[1:] if not line.startswith(('(1)', '(2)'))]
        if findings:
            return findings[0].removeprefix(UNPICKLER_FINDING).split('. ', 1)[0].strip().rstrip('.')
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Where a location's file is
# ---------------------------------------------------------------------------------------------
def resolve(location):
    """The local path of a checkpoint location: a path as given; a file:// URL's own file (read in
    place); an http(s):// URL downloaded once into the torch hub cache, under a folder named by a
    hash of the whole URL (two URLs never share a file, whatever their file names), as
    `torch.hub.get_dir()/checkpoints/<url hash>/<file name>`. A file name carrying a torch hub hash
    prefix (`name-<sha256 prefix>.ext`) is checked against the downloaded content."""
    location = os.fspath(location)
    url = urllib.parse.urlparse(location)
    if url.scheme == 'file':
        if url.netloc not in ('', 'localhost'):
            raise CheckpointError(f"checkpoint URL {location} names another host; a file:// URL "
                                  f"reads a file of this machine")
        return urllib.request.url2pathname(url.path)
    if url.scheme not in ('http', 'https'):
        return location
    name = os.path.basename(url.path)
    if not name:
        raise CheckpointError(f"checkpoint URL {location} does not end in a file name")
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints',
                          hashlib.sha256(location.encode()).hexdigest()[:16])
    cached = os.path.join(folder, name)
    if os.path.isfile(cached):
        return cached
    hash_match = torch.hub.HASH_REGEX.search(name)
    os.makedirs(folder, exist_ok=True)
    try:  # writes a temporary file and renames it: an interrupted download leaves no file
        torch.hub.download_url_to_file(location, cached, hash_prefix=hash_match and hash_match.group(1) or None,
                                       progress=False)
    except urllib.error.HTTPError as err:
        raise CheckpointError(f"cannot download checkpoint {location}: the server answered "
                              f"{_http_failure(err)}") from None
    except (urllib.error.URLError, OSError) as err:
        raise CheckpointError(f"cannot download checkpoint {location}: "
                              f"{getattr(err, 'reason', err)}") from None
    except RuntimeError as err:  # download_url_to_file's hash check
        raise CheckpointError(f"downloaded checkpoint {location} is not the file its name promises: "
                              f"{error_line(err)}") from None
    finally:
        if not os.listdir(folder):
            os.rmdir(folder)
    return cached


def _http_failure(err):
    """'HTTP <code> <reason>', followed by the error code and message of an Azure/S3-style XML
    body (<Error><Code>PublicAccessNotPermitted</Code><Message>...</Message></Error>)."""
    failure = f"HTTP {err.code} {err.reason}"
    try:
        error = ElementTree.fromstring(err.read(MAX_ERROR_BODY))
    except (ElementTree.ParseError, OSError, ValueError):
        return failure
    code = (error.findtext('Code') or '').strip()
    message = (error.findtext('Message') or '').strip().splitlines()
    if code:
        failure += f": {code}" + (f" ({message[0].strip()})" if message else '')
    return failure


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_checkpoint(location):
    """The contents of the checkpoint at `location`, on the CPU (see the module docstring).
    Raises a one-line CheckpointError naming the file when it cannot be used."""
    path = resolve(location)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, 'rb') as f:
        head = f.read(HEAD_BYTES)
    if head.startswith(ZIP_MAGIC) or LEGACY_TORCH_MAGIC in head:
        contents = _read_torch(path)
    elif head[8:9] == b'{':  # safetensors: an 8-byte header length, then the JSON header
        contents = _read_safetensors(path)
    elif head[:1] == pickle.PROTO and head[1:2] in PICKLE_PROTOCOLS:
        contents = _read_pdparams(path)
    else:
        raise CheckpointError(f"{path} is not a checkpoint: neither a PyTorch file, a safetensors "
                              f"file nor a .pdparams")
    if not isinstance(contents, Mapping) or not contents:
        raise CheckpointError(f"{path} is not a checkpoint: it holds a "
                              f"{type(contents).__name__}, not a dict of tensors")
    return contents


def _read_torch(path):
    # The original repository's training checkpoints pickle their yacs CfgNode (a dict subclass):
    # rebuilt as an OrderedDict of its values, nothing of yacs runs.
    try:
        with torch.serialization.safe_globals([(collections.OrderedDict, 'yacs.config.CfgNode')]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or damaged file
        if str(err).startswith(WEIGHTS_ONLY_FAILURE):
            raise CheckpointError(f"{path} is refused: {error_line(err)} (a PyTorch checkpoint "
                                  f"may hold tensors, plain containers and a yacs config)") from None
        first_sentence = error_line(err).split('. ', 1)[0]  # the rest is torch's advice
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or "
                              f"damaged): {first_sentence}") from None


def _read_safetensors(path):
    try:
        return safetensors.torch.load_file(path, device='cpu')
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or "
                              f"damaged): {error_line(err)}") from None


class _Refused(pickle.UnpicklingError):
    """A global that a .pdparams may not use."""


def _numeric_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.kind not in NUMERIC_KINDS:
        raise _Refused(f"a numpy array of dtype {dtype}")
    return dtype


class _ArrayClass:
    """Stands for numpy.ndarray in a .pdparams: the argument `_reconstruct` expects, and not
    callable itself (numpy.ndarray(shape, 'O') would build an object array)."""


def _numeric_array(cls, shape, dtype):
    if cls is not _ArrayClass:
        raise _Refused(f"numpy's array reconstructor called with {cls!r}")
    return _RECONSTRUCT_ARRAY(np.ndarray, shape, _numeric_dtype(dtype))


# numpy's own array reconstructor, whatever module it lives in (numpy.core, numpy._core)
_RECONSTRUCT_ARRAY = np.empty(0).__reduce__()[0]
# What a .pdparams may reference: numpy's array and dtype reconstruction (the module is
# numpy._core since numpy 2, numpy.core before) and the containers paddle.save writes; a tensor
# nested below the top level is pickled as a (variable name, array) tuple.
PDPARAMS_GLOBALS = {
    ('numpy._core.multiarray', '_reconstruct'): _numeric_array,
    ('numpy.core.multiarray', '_reconstruct'): _numeric_array,
    ('numpy', 'ndarray'): _ArrayClass,
    ('numpy', 'dtype'): _numeric_dtype,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'tuple'): tuple,
}


class _PdparamsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in PDPARAMS_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return PDPARAMS_GLOBALS[module, name]

    def persistent_load(self, pid):
        raise _Refused(f"a persistent id ({type(pid).__name__})")


def _read_pdparams(path):
    try:
        with open(path, 'rb') as f:
            contents = _PdparamsUnpickler(f).load()
    except _Refused as err:
        raise CheckpointError(f"{path} is refused: it holds {err} (a .pdparams may hold numeric "
                              f"numpy arrays and plain containers)") from None
    except Exception as err:  # pickle raises many types for a truncated or damaged file
        raise CheckpointError(f"{path} is not a readable .pdparams (truncated or damaged): "
                              f"{type(err).__name__}: {error_line(err)}") from None
    try:
        return from_paddle(contents)
    except ValueError as err:
        raise CheckpointError(f"{path} is not a PaddlePaddle state dict: {err}") from None


def from_paddle(contents):
    """The released-layout state dict of a PaddleViT file's contents: a state dict of numpy
    arrays (PaddleViT's releases) or a training checkpoint {'model', 'model_ema', 'optimizer', ...}
    (its EMA weights preferred, as PaddleViT's own evaluation and fine-tuning take them; the
    optimizer, keyed by Paddle's variable names, has no use here). Names are the reference's
    already; Linear weights, which Paddle stores as (in, out), are transposed (every 2-D `.weight`
    of this model is a Linear's); paddle.save's name table is dropped. Raises ValueError naming
    an entry that is not an array."""
    if not isinstance(contents, Mapping):
        raise ValueError(f"it holds a {type(contents).__name__}, not a dict")
    if isinstance(contents.get('model'), Mapping):
        contents = contents['model_ema'] if isinstance(contents.get('model_ema'), Mapping) else contents['model']
    state_dict = {}
    for key, value in contents.items():
        if key == PADDLE_NAME_TABLE:
            continue
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            value = value[1]  # (variable name, array): a tensor below the top level
        if not isinstance(value, np.ndarray):
            raise ValueError(f"entry {key} is a {type(value).__name__}, not an array")
        tensor = torch.from_numpy(value.astype(value.dtype.newbyteorder('='), copy=False))
        if key.endswith('.weight') and tensor.dim() == 2:
            tensor = tensor.t()
        state_dict[key] = tensor.contiguous()
    return state_dict


# ---------------------------------------------------------------------------------------------
# The model weights and whether they fit
# ---------------------------------------------------------------------------------------------
def unwrap_state_dict(checkpoint):
    """The plain model state dict inside `checkpoint`: a raw state dict or `{'model': ...}` (the
    original's layout and ours), its keys without the prefixes of a DDP or compiled model.

    Raises ValueError when there is no state dict of tensors, naming the first entry that is not one.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'expected a dict of tensors, got a {type(checkpoint).__name__}')
    state_dict = checkpoint['model'] if isinstance(checkpoint.get('model'), Mapping) else checkpoint
    if not state_dict:
        raise ValueError('the state dict is empty')
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f'entry {key} is a {type(value).__name__}, not a tensor')
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                stripped = True
    return dict(state_dict)


def model_weights(checkpoint, path):
    """unwrap_state_dict, failing with a CheckpointError naming `path`."""
    try:
        return unwrap_state_dict(checkpoint)
    except ValueError as err:
        raise CheckpointError(f"{path} is not a model checkpoint ({err}): expected a state dict of "
                              f"tensors or a dict with a 'model' state dict") from None


def _listed(keys):
    keys = list(keys)
    shown = ', '.join(keys[:KEYS_SHOWN])
    return shown + (f' (+{len(keys) - KEYS_SHOWN} more)' if len(keys) > KEYS_SHOWN else '')


def key_mismatch(missing=(), unexpected=(), wrong_shape=()):
    """One line naming the missing, unexpected and wrong-shape keys, the first few of each in
    the order given ('' when there are none); `wrong_shape` entries read
    'key (checkpoint shape) vs (model shape)'."""
    problems = []
    if missing:
        problems.append(f'missing keys: {_listed(missing)}')
    if unexpected:
        problems.append(f'unexpected keys: {_listed(unexpected)}')
    if wrong_shape:
        problems.append(f'wrong shape (checkpoint vs model): {_listed(wrong_shape)}')
    return '; '.join(problems)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def atomic_write(path, write):
    """Call `write(f)` on a temporary binary file in the same folder, flush it to disk, then
    rename it to `path`: a kill at any instant leaves either the previous file or the complete
    new one under `path`, never a truncated one."""
    folder, name = os.path.split(path)
    tmp_path = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    try:
        with open(tmp_path, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    dir_fd = os.open(folder or '.', os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_safetensors(source, destination):
    """Convert the checkpoint at `source` (any accepted format and layout, a path or URL) into a
    safetensors file of its model weights in the released layout, written atomically; returns
    the number of tensors. Nothing is written unless the source reads completely."""
    weights = model_weights(read_checkpoint(source), source)
    data = safetensors.torch.save({key: value.contiguous() for key, value in weights.items()},
                                  metadata={'format': 'pt'})
    atomic_write(os.fspath(destination), lambda f: f.write(data))
    return len(weights)
