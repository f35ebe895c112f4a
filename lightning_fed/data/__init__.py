"""Sites, partitioners and dataset loaders."""

from lightning_fed.data.ct import CTFolderSite, CTFolderSites
from lightning_fed.data.ct_vendors import SimulatedCTHospitals
from lightning_fed.data.fashion_mnist import FashionMNISTDataModule, HospitalsDataModule, load_fashion_mnist
from lightning_fed.data.flamby import FedHeartDisease, FedTcgaBrca
from lightning_fed.data.heart_disease import HeartDiseaseSites, load_heart_disease
from lightning_fed.data.medmnist import MedMNISTSites, load_medmnist
from lightning_fed.data.mosaic import FashionMosaicSites
from lightning_fed.data.partition import IID, Dirichlet, Partitioner, SizeAndRatio, split_fractions
from lightning_fed.data.sites import SimulatedSiteData, Site, describe_sites, simulate_sites
from lightning_fed.data.tensors import GatheredBatch, TensorBatches, collate

__all__ = [
    "GatheredBatch",
    "TensorBatches",
    "collate",
    "CTFolderSite",
    "CTFolderSites",
    "HeartDiseaseSites",
    "IID",
    "MedMNISTSites",
    "Dirichlet",
    "FashionMNISTDataModule",
    "FashionMosaicSites",
    "FedHeartDisease",
    "FedTcgaBrca",
    "HospitalsDataModule",
    "Partitioner",
    "Site",
    "SimulatedCTHospitals",
    "SimulatedSiteData",
    "SizeAndRatio",
    "describe_sites",
    "load_fashion_mnist",
    "load_heart_disease",
    "load_medmnist",
    "simulate_sites",
    "split_fractions",
]
