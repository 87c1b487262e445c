"""One module per provider, each implementing ``controller.provision.contract.Provider``."""
