from train.bytecode import keep_bytecode

keep_bytecode()  # before torch and transformers are imported

from train.sft import main  # noqa: E402

if __name__ == "__main__":
    main()
