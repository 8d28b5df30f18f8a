//! A second handle on the buffer for another thread of the process that opened it (the
//! daemon's upload thread beside its supervisor).

use super::{schema, Recovery, Store, StoreError};

impl Store {
    /// Another connection to this buffer, for another thread of the same process. It takes no
    /// lock (this store's lock already marks the process as the buffer's owner, or not), runs no
    /// check and no recovery (this store's open did them) and logs nothing: it is the same
    /// owner, not another process. Its [`Store::recovery`] is empty; its caps are this store's.
    pub fn another_handle(&self) -> Result<Store, StoreError> {
        let opened = schema::open(&self.path, false)?;
        Ok(Store {
            conn: opened.connection,
            path: self.path.clone(),
            dir: self.dir.clone(),
            caps: self.caps,
            recovery: Recovery::default(),
            // The process's owning handle keeps the reserve file; this one only shares it.
            owner: false,
            _lock: None,
        })
    }
}
