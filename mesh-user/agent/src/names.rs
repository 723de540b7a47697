//! Interned namespace and service names, the ids the kernel maps are keyed by, kept stable
//! across restarts in the state directory.

use super::*;

/// Interned namespace and service names: the ids in the kernel's service, pod and intention
/// maps. Kept stable across restarts (the maps outlive the agent, so a restarted agent must
/// mean the same name by the same id): the strings are recorded, in id order, in the state
/// directory. Holds the intentions' kernel form too, compiled with these ids and brought up to
/// date change by change ([`Names::compile`]).
#[derive(Debug)]
pub struct Names {
    path: PathBuf,
    /// The kernel form of the rules last compiled; its interner is the name table.
    compiled: CompiledRules,
    /// How many names the file holds.
    saved: usize,
}

impl Names {
    /// Loads the names recorded at `path` (a JSON array of strings in id order, id 0 first);
    /// a missing file is an empty table. New names will be recorded there.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file cannot be read or is not a JSON array of strings,
    /// [`Error::Intentions`] if a recorded name cannot be interned.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut interner = Interner::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let strings: Vec<String> = serde_json::from_str(&text).map_err(|e| Error::Io {
                    what: format!("interned names in {}", path.display()),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?;
                for s in strings.iter().skip(1) {
                    interner.intern(s)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        }
        let saved = interner.len();
        Ok(Self {
            path: path.to_path_buf(),
            compiled: CompiledRules::new(interner),
            saved,
        })
    }

    /// The id of `s`, assigning (and durably recording) a new one if needed.
    ///
    /// # Errors
    ///
    /// [`Error::Intentions`] if the interner is full, [`Error::Io`] if the grown table cannot
    /// be written.
    pub fn id(&mut self, s: &str) -> Result<u32, Error> {
        if let Some(id) = self.compiled.interner().get(s) {
            return Ok(id);
        }
        let id = self.compiled.interner_mut().intern(s)?;
        self.save()?;
        Ok(id)
    }

    /// The names interned so far, for resolving ids back to strings.
    pub fn interner(&self) -> &Interner {
        self.compiled.interner()
    }

    /// Brings the intentions' kernel form to `rules` and returns the entries that changed
    /// (only the pairs `rules`' writes touched since the last call are compiled, see
    /// [`CompiledRules::update`]), recording any new names.
    ///
    /// # Errors
    ///
    /// [`Error::Intentions`] if the interner is full (the next call compiles in full),
    /// [`Error::Io`] if the grown table cannot be written.
    pub fn compile(&mut self, rules: &RuleSet) -> Result<Vec<KernelChange>, Error> {
        let changes = self.compiled.update(rules)?;
        if self.compiled.interner().len() > self.saved {
            self.save()?;
        }
        Ok(changes)
    }

    /// The intentions' kernel form as last compiled.
    pub fn compiled(&self) -> &CompiledRules {
        &self.compiled
    }

    fn save(&mut self) -> Result<(), Error> {
        let interner = self.compiled.interner();
        self.saved = interner.len();
        let strings: Vec<&str> = (0..interner.len() as u32)
            .filter_map(|id| interner.resolve(id))
            .collect();
        let text = serde_json::to_string(&strings).expect("a list of strings");
        mesh_core::durable::write(&self.path, text.as_bytes(), 0o644)
            .map_err(io_err(format!("writing {}", self.path.display())))
    }
}
