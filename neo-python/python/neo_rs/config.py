"""ZConfig factory of the <NEOStorage> section (see component.xml)."""

from ZODB.config import BaseConfig


class NeoStorage(BaseConfig):

    def open(self):
        from . import Storage
        config = self.config
        kw = {}
        for name in config.getSectionAttributes():
            value = getattr(config, name)
            if value is not None:
                kw[name] = value
        return Storage(**kw)
